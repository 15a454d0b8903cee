//! The PROXY protocol header from the front hop (v1 text and v2 binary): any bytes either
//! yield an address, "keep the peer" (UNKNOWN/LOCAL) or an error — never a panic, and never
//! an address from bytes that do not start with a PROXY signature.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seg::transport::proxy_protocol::{parse_v1, parse_v2, read_header};

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut input = data;
    let read = runtime.block_on(read_header(&mut input));
    if let Ok(Some(_)) = read {
        assert!(
            data.starts_with(b"PROXY ") || data.starts_with(V2_SIGNATURE),
            "an address from a non-PROXY preamble"
        );
    }
    let _ = parse_v1(data);
    if let [version_command, family, body @ ..] = data {
        let _ = parse_v2(*version_command, *family, body);
    }
});
