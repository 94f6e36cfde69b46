//! ferry's control-plane model: the config file (AgentConfig + Cofide `FederatedService`
//! objects), SPIFFE identity types, and loopback VIP allocation.
#![forbid(unsafe_code)]

pub mod config;
pub mod spiffe;
pub mod vip;
