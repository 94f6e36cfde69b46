//! The one error type of the `workload-api` crate.

use std::path::PathBuf;

/// Why the Workload API could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CA could not be opened or used.
    #[error(transparent)]
    Ca(#[from] attest::Error),
    /// Another process is serving on the socket path.
    #[error("Workload API socket {} is in use by a running process (stop it, or set listen.workloadApi to another path)", path.display())]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The path exists and is not a socket: we refuse to delete it.
    #[error("{} exists and is not a socket; refusing to replace it (remove it or choose another listen.workloadApi)", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Binding or preparing the listener failed.
    #[error("cannot listen on {endpoint}: {action}: {source}")]
    Listen {
        /// The endpoint as configured.
        endpoint: String,
        /// What was being done.
        action: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The gRPC server stopped with an error.
    #[error("Workload API server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// A federated bundle file could not be read or parsed.
    #[error("trust bundle {} for {trust_domain}: {reason}", path.display())]
    Bundle {
        /// The trust domain.
        trust_domain: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}
