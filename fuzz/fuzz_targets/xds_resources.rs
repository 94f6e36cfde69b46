//! Fuzzes the ADS client's decoders, the boundary where a control plane's bytes become
//! ferry's routing: any bytes as a `Cluster` or `ClusterLoadAssignment` must decode and
//! convert (`TryFrom`) to a domain type or a per-resource error, never a panic.
#![no_main]

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use xds::client::model::{ClusterInfo, Endpoints};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        if let Ok(c) = Cluster::decode(rest) {
            let _ = ClusterInfo::try_from(&c);
        }
    } else if let Ok(cla) = ClusterLoadAssignment::decode(rest) {
        let _ = Endpoints::try_from(&cla);
    }
});
