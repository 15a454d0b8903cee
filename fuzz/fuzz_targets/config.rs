//! The configuration loader on any text: a Config or a list of problems, each naming a key —
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seg::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::parse(text, std::path::Path::new("/nonexistent"), "fuzz.toml") {
        assert!(!e.to_string().is_empty());
    }
});
