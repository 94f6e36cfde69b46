//! What `ferry attest info` reports about a TPM: who made it, its firmware, its EK
//! certificate, and whether the node CA key exists. Operators run it before switching
//! `ca.backend` to `tpm`, and when attestation fails.
