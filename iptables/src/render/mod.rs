//! The two renderers of a [`RuleSet`](crate::RuleSet): `iptables-restore` input and a
//! native nft script, each in the form its tool prints back.

pub mod nft;
pub mod restore;
