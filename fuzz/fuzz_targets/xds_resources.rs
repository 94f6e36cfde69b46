//! Fuzzes the ADS client's decoders, the boundary where a control plane's bytes become
//! ferry's routing: any bytes as a `Cluster`, `ClusterLoadAssignment` or `Listener` must
//! decode and convert (`TryFrom`) to a domain type or a per-resource error, never a panic.
#![no_main]

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use xds::client::model::{DnsListener, Endpoints, OutboundListener, Upstream};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(c) = Cluster::decode(rest) {
                let _ = Upstream::try_from(&c);
            }
        }
        1 => {
            if let Ok(cla) = ClusterLoadAssignment::decode(rest) {
                let _ = Endpoints::try_from(&cla);
            }
        }
        _ => {
            if let Ok(l) = Listener::decode(rest) {
                let _ = OutboundListener::try_from(&l);
                let _ = DnsListener::try_from(&l);
            }
        }
    }
});
