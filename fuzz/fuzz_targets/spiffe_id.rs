//! Fuzzes SPIFFE ID and trust domain parsing: never a panic, and whatever parses
//! round-trips through its string form (the form that goes into URI SANs).
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry::spiffe::{SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(s) {
        let again = SpiffeId::parse(&id.to_string()).expect("a parsed ID re-parses");
        assert_eq!(again, id);
        assert!(id.to_string().starts_with("spiffe://"));
    }
    if let Ok(td) = TrustDomain::parse(s) {
        let again = TrustDomain::parse(td.as_str()).expect("a parsed trust domain re-parses");
        assert_eq!(again, td);
    }
});
