//! Fuzzes the config loader: any text given as `ferry.yaml` (YAML syntax, multi-document,
//! type mismatches, positions) must produce a config or located diagnostics, never a
//! panic; every diagnostic must point inside the text.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use registry::config::{ConfigError, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    // A base dir that does not exist: relative bundle paths fail to read, as they may.
    match parse(src, Path::new("fuzz.yaml"), Path::new("/nonexistent-ferry-fuzz")) {
        Ok(loaded) => {
            // Whatever validated serialises (it is what /config_dump would show).
            let _ = serde_json::to_string(&loaded.config);
        }
        Err(ConfigError::Invalid { errors, .. }) => {
            assert!(!errors.is_empty(), "an invalid config names at least one error");
            // YAML breaks lines at LF, CRLF and a lone CR (YAML 1.2 §5.4); an error at the
            // end of the input may point one line past the last break.
            let breaks = src.matches("\r\n").count()
                + src.matches('\n').count()
                + src.matches('\r').count()
                - 2 * src.matches("\r\n").count();
            let lines = breaks + 2;
            for e in &errors {
                assert!(e.position.line <= lines, "{e} is past the end ({lines} lines)");
            }
        }
        Err(ConfigError::Read { .. }) => unreachable!("parse reads no config file"),
    }
});
