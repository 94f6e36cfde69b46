//! Fuzzes the Istio metadata exchange codec: never a panic on any stream prefix, the cap
//! holds, and whatever decodes re-encodes to bytes that decode to the same metadata (as a
//! TCP frame and as the HTTP header).
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::mx::{
    HEADER_LEN, Header, MAX_FRAME, MxError, decode_body, decode_http_header, encode_frame,
    encode_http_header, parse_header,
};

fuzz_target!(|data: &[u8]| {
    match parse_header(data) {
        Ok(Header::Frame { len }) => {
            assert!(len <= MAX_FRAME);
            let body = &data[HEADER_LEN..];
            if let Ok(meta) = decode_body(&body[..body.len().min(len)]) {
                let frame = encode_frame(&meta);
                assert_eq!(
                    parse_header(&frame).expect("own header"),
                    Header::Frame {
                        len: frame.len() - HEADER_LEN
                    }
                );
                let again = decode_body(&frame[HEADER_LEN..]).expect("own frame decodes");
                assert_eq!(again, meta);
                let mut no_id = meta.clone();
                no_id.id.clear();
                let header = encode_http_header(&meta);
                assert_eq!(
                    decode_http_header(&header).expect("own header decodes"),
                    no_id
                );
            }
        }
        Ok(Header::NeedMore) => assert!(data.len() < HEADER_LEN),
        Ok(Header::WrongMagic) => {}
        Err(MxError::TooLarge { len }) => assert!(len > MAX_FRAME),
        Err(e) => panic!("parse_header only fails with TooLarge: {e}"),
    }
    // The body decoder on raw input, and the HTTP header decoder on text.
    let _ = decode_body(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = decode_http_header(s);
    }
});
