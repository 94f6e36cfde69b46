//! Capture rules for ferry's sidecar: what makes an unmodified app's connections and DNS
//! queries reach `ferry proxy` (the init step of an injected pod).
//!
//! Flags become validated [`Options`] (an invalid flag is an error before anything is
//! touched); a profile turns them into a [`RuleSet`] (data, not strings); renderers write
//! it as `iptables-restore` input or an `nft -f` script; [`apply()`], [`verify()`] and
//! [`cleanup()`] run the real tools atomically, read the rules back, and remove exactly
//! ferry's chains. Everything but [`apply`](mod@apply) is pure.

#![forbid(unsafe_code)]

pub mod apply;
mod error;
pub mod model;
pub mod options;
pub mod profile;
pub mod render;

pub use apply::{Applied, Backend, Runner, apply, cleanup, verify};
pub use error::Error;
pub use model::RuleSet;
pub use options::{Options, Profile, RawOptions};
