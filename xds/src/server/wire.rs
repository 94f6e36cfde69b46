//! The responses ferry sends, encoded from shared, pre-encoded resources.
//!
//! Every [`Resource`] carries its protobuf encoding, built once by the translator (see
//! [`Resource::wire`]). [`SotwResponse`] and [`DeltaResponse`] hold only `Arc`s to those
//! resources and write the same bytes prost would write for an envoy `DiscoveryResponse`
//! or `DeltaDiscoveryResponse`: the field tags, lengths and the shared bytes, so a push to
//! many streams neither clones nor re-encodes a resource per stream.

use std::sync::Arc;

use prost::bytes::{Buf, BufMut};
use prost::encoding::{self, DecodeContext, WireType, encode_key, encode_varint};
use prost::{DecodeError, Message};

use crate::resources::Resource;

/// Bytes a length-delimited field takes for a payload of `len` bytes.
fn delimited_len(tag: u32, len: usize) -> usize {
    encoding::key_len(tag) + encoding::encoded_len_varint(len as u64) + len
}

/// Writes a length-delimited field (string, bytes or an encoded message).
fn put_delimited(tag: u32, payload: &[u8], buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(payload.len() as u64, buf);
    buf.put_slice(payload);
}

/// Writes a proto3 singular string: nothing when empty, like prost.
fn put_string(tag: u32, s: &str, buf: &mut impl BufMut) {
    if !s.is_empty() {
        put_delimited(tag, s.as_bytes(), buf);
    }
}

fn string_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        delimited_len(tag, s.len())
    }
}

/// A state-of-the-world response: envoy's `DiscoveryResponse` (`version_info` = 1,
/// `resources` = 2, `type_url` = 4, `nonce` = 5) with the resources' `Any`s pre-encoded.
#[derive(Debug, Default, Clone)]
pub struct SotwResponse {
    /// `version_info`.
    pub version_info: String,
    /// The resources, encoded as their `Any`s.
    pub resources: Vec<Arc<Resource>>,
    /// `type_url`.
    pub type_url: &'static str,
    /// `nonce`.
    pub nonce: String,
}

/// A response encoded in parts (head, one part per resource, tail), so that a large
/// response can be written to the wire a piece at a time.
pub trait Parts {
    /// How many parts [`Parts::write_part`] writes.
    fn parts(&self) -> usize;
    /// Writes part `i` (`0..parts()`); the parts in order are the encoded message.
    fn write_part(&self, i: usize, buf: &mut impl BufMut);
    /// The length of the encoded message.
    fn message_len(&self) -> usize;
}

impl Parts for SotwResponse {
    fn parts(&self) -> usize {
        self.resources.len() + 2
    }

    fn write_part(&self, i: usize, buf: &mut impl BufMut) {
        if i == 0 {
            put_string(1, &self.version_info, buf);
        } else if let Some(r) = self.resources.get(i - 1) {
            put_delimited(2, r.any_wire(), buf);
        } else {
            put_string(4, self.type_url, buf);
            put_string(5, &self.nonce, buf);
        }
    }

    fn message_len(&self) -> usize {
        self.encoded_len()
    }
}

impl Message for SotwResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for i in 0..self.parts() {
            self.write_part(i, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        // Send-only: ferry never decodes its own responses.
        encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        string_len(1, &self.version_info)
            + self
                .resources
                .iter()
                .map(|r| delimited_len(2, r.any_wire().len()))
                .sum::<usize>()
            + string_len(4, self.type_url)
            + string_len(5, &self.nonce)
    }

    fn clear(&mut self) {
        *self = SotwResponse::default();
    }
}

/// An incremental response: envoy's `DeltaDiscoveryResponse` (`system_version_info` = 1,
/// `resources` = 2, `type_url` = 4, `nonce` = 5, `removed_resources` = 6) with each
/// `Resource` (name, version, `Any`) pre-encoded.
#[derive(Debug, Default, Clone)]
pub struct DeltaResponse {
    /// `system_version_info`.
    pub system_version_info: String,
    /// The added or updated resources.
    pub resources: Vec<Arc<Resource>>,
    /// `type_url`.
    pub type_url: &'static str,
    /// `nonce`.
    pub nonce: String,
    /// `removed_resources`.
    pub removed_resources: Vec<String>,
}

impl Parts for DeltaResponse {
    fn parts(&self) -> usize {
        self.resources.len() + 2
    }

    fn write_part(&self, i: usize, buf: &mut impl BufMut) {
        if i == 0 {
            put_string(1, &self.system_version_info, buf);
        } else if let Some(r) = self.resources.get(i - 1) {
            put_delimited(2, r.wire(), buf);
        } else {
            put_string(4, self.type_url, buf);
            put_string(5, &self.nonce, buf);
            for n in &self.removed_resources {
                put_delimited(6, n.as_bytes(), buf);
            }
        }
    }

    fn message_len(&self) -> usize {
        self.encoded_len()
    }
}

impl Message for DeltaResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for i in 0..self.parts() {
            self.write_part(i, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        string_len(1, &self.system_version_info)
            + self
                .resources
                .iter()
                .map(|r| delimited_len(2, r.wire().len()))
                .sum::<usize>()
            + string_len(4, self.type_url)
            + string_len(5, &self.nonce)
            + self
                .removed_resources
                .iter()
                .map(|n| delimited_len(6, n.len()))
                .sum::<usize>()
    }

    fn clear(&mut self) {
        *self = DeltaResponse::default();
    }
}

/// Encodes envoy's delta `Resource` message (`version` = 1, `resource` = 2, `name` = 3)
/// for `name`, `version` and the encoded `Any` `any`; returns the bytes and the range of
/// the `Any` inside them.
pub(crate) fn encode_resource(
    name: &str,
    version: &str,
    any: &[u8],
) -> (Vec<u8>, std::ops::Range<usize>) {
    let mut buf = Vec::with_capacity(
        string_len(1, version) + delimited_len(2, any.len()) + string_len(3, name),
    );
    put_string(1, version, &mut buf);
    encode_key(2, WireType::LengthDelimited, &mut buf);
    encode_varint(any.len() as u64, &mut buf);
    let start = buf.len();
    buf.put_slice(any);
    let range = start..buf.len();
    put_string(3, name, &mut buf);
    (buf, range)
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryResponse, DiscoveryResponse, Resource as PbResource,
    };

    use super::*;
    use crate::resources::ResourceType;

    fn resources() -> Vec<Arc<Resource>> {
        ["a", "b", ""]
            .iter()
            .map(|n| {
                let c = Cluster {
                    name: (*n).to_owned(),
                    ..Default::default()
                };
                Arc::new(Resource::new((*n).to_owned(), &c, n).unwrap())
            })
            .collect()
    }

    #[test]
    fn sotw_is_byte_identical_to_prost() {
        for (version, nonce, rs) in [("v1", "7", resources()), ("", "", Vec::new())] {
            let ours = SotwResponse {
                version_info: version.to_owned(),
                resources: rs.clone(),
                type_url: ResourceType::Cluster.type_url(),
                nonce: nonce.to_owned(),
            };
            let theirs = DiscoveryResponse {
                version_info: version.to_owned(),
                resources: rs.iter().map(|r| r.any().unwrap()).collect(),
                type_url: ResourceType::Cluster.type_url().to_owned(),
                nonce: nonce.to_owned(),
                ..Default::default()
            };
            let bytes = ours.encode_to_vec();
            assert_eq!(bytes.len(), ours.encoded_len());
            assert_eq!(bytes, theirs.encode_to_vec());
            assert_eq!(DiscoveryResponse::decode(bytes.as_slice()).unwrap(), theirs);
        }
    }

    #[test]
    fn delta_is_byte_identical_to_prost() {
        let rs = resources();
        let ours = DeltaResponse {
            system_version_info: "sys".to_owned(),
            resources: rs.clone(),
            type_url: ResourceType::Cluster.type_url(),
            nonce: "3".to_owned(),
            removed_resources: vec!["gone".to_owned(), String::new()],
        };
        let theirs = DeltaDiscoveryResponse {
            system_version_info: "sys".to_owned(),
            resources: rs
                .iter()
                .map(|r| PbResource {
                    name: r.name.clone(),
                    version: r.version.clone(),
                    resource: Some(r.any().unwrap()),
                    ..Default::default()
                })
                .collect(),
            type_url: ResourceType::Cluster.type_url().to_owned(),
            nonce: "3".to_owned(),
            removed_resources: vec!["gone".to_owned(), String::new()],
            ..Default::default()
        };
        let bytes = ours.encode_to_vec();
        assert_eq!(bytes.len(), ours.encoded_len());
        assert_eq!(bytes, theirs.encode_to_vec());
        assert_eq!(
            DeltaDiscoveryResponse::decode(bytes.as_slice()).unwrap(),
            theirs
        );
    }
}
