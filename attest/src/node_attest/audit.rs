//! The root's record of every node-attestation decision: one JSON object per line in
//! `<ca.stateDir>/node-attestation-audit.jsonl` (0600), appended and flushed before the
//! node gets its answer, so that no certificate is issued, and no refusal happens,
//! without a trace.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use serde::Serialize;

/// The file name of the audit log in the CA state directory.
pub const AUDIT_FILE: &str = "node-attestation-audit.jsonl";

/// One decision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// When (RFC 3339, UTC).
    pub time: String,
    /// Who asked: the peer address of the TLS connection.
    pub peer: String,
    /// The attestation session, when one was opened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// `Begin` or `Complete`.
    pub step: &'static str,
    /// SHA-256 of the EK public key, when the EK certificate parsed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ek_pub_hash: Option<String>,
    /// `challenged`, `accepted` or `rejected`.
    pub result: &'static str,
    /// Why it was rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The serial of the node CA issued on acceptance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_ca_serial: Option<String>,
    /// The selectors the node was attested with.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub selectors: Vec<String>,
}

/// An append-only JSON-lines audit file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    /// One writer at a time, so lines never interleave.
    lock: Mutex<()>,
}

impl AuditLog {
    /// The audit log in `state_dir` (created on the first record).
    pub fn in_dir(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(AUDIT_FILE),
            lock: Mutex::new(()),
        }
    }

    /// Where the records go.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` (its `time` is set here). A record that cannot be written is logged
    /// as an error: the decision stands, the operator sees why the trail has a gap.
    pub fn write(&self, mut record: AuditRecord) {
        record.time = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let _one = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let res = serde_json::to_vec(&record)
            .map_err(std::io::Error::other)
            .and_then(|mut line| {
                line.push(b'\n');
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(&self.path)?;
                f.write_all(&line)?;
                f.sync_data()
            });
        match res {
            Ok(()) => tracing::info!(
                peer = %record.peer,
                step = record.step,
                result = record.result,
                ek_pub_hash = record.ek_pub_hash.as_deref().unwrap_or("-"),
                reason = record.reason.as_deref().unwrap_or("-"),
                "node attestation"
            ),
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, ?record, "cannot write the node attestation audit record")
            }
        }
    }
}
