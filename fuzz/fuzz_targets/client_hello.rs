//! Fuzzes the gateway's ClientHello parser: never a panic, in any chunking; a parse of a
//! prefix never contradicts the parse of the whole (NeedMore, or the same verdict); SNI is
//! ASCII and ALPN entries non-empty.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::gateway::client_hello::{MAX_HELLO, Parsed, parse};

fuzz_target!(|data: &[u8]| {
    let mut scratch = Vec::new();
    let whole = match parse(data, &mut scratch) {
        Ok(Parsed::Hello(h)) => {
            if let Some(sni) = h.sni {
                assert!(sni.is_ascii() && !sni.is_empty());
            }
            assert!(h.alpn.iter().all(|p| !p.is_empty()));
            Some(Ok((
                h.sni.map(str::to_owned),
                h.alpn.iter().map(|a| a.to_vec()).collect::<Vec<_>>(),
            )))
        }
        Ok(Parsed::NeedMore) => {
            assert!(data.len() < MAX_HELLO);
            None
        }
        Err(e) => Some(Err(e)),
    };
    // Every prefix is either still incomplete or reaches the same verdict.
    let cut = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut scratch2 = Vec::new();
    match parse(&data[..cut], &mut scratch2) {
        Ok(Parsed::NeedMore) => {}
        Ok(Parsed::Hello(h)) => {
            let got = (
                h.sni.map(str::to_owned),
                h.alpn.iter().map(|a| a.to_vec()).collect::<Vec<_>>(),
            );
            assert_eq!(whole, Some(Ok(got)));
        }
        Err(e) => assert_eq!(whole, Some(Err(e))),
    }
});
