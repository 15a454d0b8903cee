//! LDIF writing shared by the slapd and Samba test directories.

use std::fmt::Write as _;

use base64::Engine as _;

/// Appends `name: value`, or `name:: base64` when the value is not an LDIF
/// SAFE-STRING (or ends in a space, which some readers strip).
pub fn ldif_line(out: &mut String, name: &str, value: &[u8]) {
    let safe = value
        .iter()
        .all(|&b| b.is_ascii() && b != 0 && b != b'\r' && b != b'\n')
        && !matches!(value.first(), Some(b' ' | b':' | b'<'))
        && value.last() != Some(&b' ');
    if safe {
        let text = std::str::from_utf8(value).expect("checked ASCII");
        writeln!(out, "{name}: {text}").expect("writing to a String");
    } else {
        let encoded = base64::engine::general_purpose::STANDARD.encode(value);
        writeln!(out, "{name}:: {encoded}").expect("writing to a String");
    }
}

/// Escapes an RDN attribute value (RFC 4514).
pub fn escape_rdn_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && matches!(c, ' ' | '#'))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
