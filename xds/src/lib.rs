//! ferry's control plane: the config file (AgentConfig + Cofide `FederatedService`
//! objects), SPIFFE identity types, loopback VIP allocation, the translation of the
//! registry into Envoy xDS resources, the ADS server that serves them (SotW and Delta) and
//! the ADS client ferry's own proxy and DNS read them with.
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod resources;
pub mod server;
pub mod spiffe;
pub mod vip;
