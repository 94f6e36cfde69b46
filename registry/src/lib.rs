//! ferry's shared model, the leaf every other crate builds on: the config file (AgentConfig
//! and the Cofide `FederatedService` objects of the `registry.cofide.io` CRD group, with
//! validation that reports every mistake at once with its position, and a watcher that keeps
//! a validated snapshot current), SPIFFE identity types, loopback VIP allocation, and the
//! Istio objects a serving zone needs (`istio_export`, printed by `ferry export`).
//!
//! It deliberately knows nothing of xDS, gRPC or sockets: the CA, the resolver, the xDS
//! translation and the proxy all read the same model without compiling each other.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod config;
pub mod file_watch;
pub mod hostname;
pub mod istio_export;
pub mod latest;
pub mod spiffe;
pub mod vip;
