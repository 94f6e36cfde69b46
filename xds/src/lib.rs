//! ferry's xDS: the translation of the registry (the `registry` crate's model) into Envoy
//! xDS resources, the ADS server that serves them (SotW and Delta) and
//! the ADS client ferry's own proxy and DNS read them with.
#![forbid(unsafe_code)]

pub mod client;
pub mod resources;
pub mod server;
pub mod type_url;
