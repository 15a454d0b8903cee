//! Both ActiveSync query forms: any bytes either parse into a request or give a QueryError,
//! never a panic; a parsed request's fields hold no control characters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seg::activesync::EasRequest;

fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    let headers = http::HeaderMap::new();
    for require in [true, false] {
        if let Ok(request) = EasRequest::parse(Some(query), &headers, require) {
            for field in [&request.user, &request.device_id, &request.device_type].into_iter().flatten() {
                assert!(!field.chars().any(char::is_control), "control character in {field:?}");
            }
            let _ = request.command_label();
        }
    }
});
