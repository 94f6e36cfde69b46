//! Fuzzes the Workload API's HTTP/2 authority shim, which reads every byte a local client
//! sends before h2 does: any byte stream, cut into arbitrary chunks, must be rewritten or
//! refused with an error, never panic, never consume more than it was given, and never
//! hold more than one frame's worth of unconsumed input. The HPACK decoder it uses is fed
//! the same bytes directly too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use workload_api::authority_shim::{H2Limits, Rewriter};
use workload_api::hpack::Decoder;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    // Half the inputs start with a valid preface so the frame parser is reached.
    let mut stream = Vec::with_capacity(PREFACE.len() + rest.len());
    if chunk & 1 == 1 {
        stream.extend_from_slice(PREFACE);
    }
    stream.extend_from_slice(rest);
    let step = usize::from(chunk >> 1).max(1);

    let mut shim = Rewriter::new(H2Limits::default());
    let mut pending: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    for piece in stream.chunks(step) {
        pending.extend_from_slice(piece);
        match shim.process(&pending, &mut out) {
            Ok(n) => {
                assert!(n <= pending.len(), "consumed more than given");
                pending.drain(..n);
                assert!(
                    pending.len() <= shim.max_needed() + step,
                    "buffered {} bytes, more than a frame",
                    pending.len()
                );
            }
            Err(_) => break,
        }
        out.clear();
    }

    let mut dec = Decoder::new(4096);
    let _ = dec.decode(rest, true);
});
