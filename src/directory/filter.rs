//! RFC 4515 filter building. Every value that reaches a filter goes through `escape_value`.

use std::fmt::Write as _;

/// Escapes a value for an LDAP filter: `*`, `(`, `)`, `\` and NUL as RFC 4515 requires, and
/// every other control or non-ASCII byte byte-wise (`\xx`), so binary values are safe too.
pub fn escape_value(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len());
    for &b in value {
        match b {
            b'*' | b'(' | b')' | b'\\' | 0 => {
                let _ = write!(out, "\\{b:02x}");
            }
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\{b:02x}");
            }
        }
    }
    out
}

/// `(&(objectClass=user)(!(objectClass=computer))(|(attr=v1)(attr=v2)…))`.
pub fn user_filter(attribute: &str, values: &[String]) -> String {
    let mut out = String::from("(&(objectClass=user)(!(objectClass=computer))");
    let alternatives = values.len() > 1;
    if alternatives {
        out.push_str("(|");
    }
    for v in values {
        let _ = write!(out, "({attribute}={})", escape_value(v.as_bytes()));
    }
    if alternatives {
        out.push(')');
    }
    out.push(')');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4515_escapes() {
        assert_eq!(escape_value(b"a*b"), "a\\2ab");
        assert_eq!(escape_value(b"a)(uid=*"), "a\\29\\28uid=\\2a");
        assert_eq!(escape_value(b"back\\slash"), "back\\5cslash");
        assert_eq!(escape_value(b"nul\0"), "nul\\00");
        assert_eq!(escape_value(&[0x01, 0xff, 0x41]), "\\01\\ffA");
        assert_eq!(escape_value("é".as_bytes()), "\\c3\\a9");
    }

    #[test]
    fn filters() {
        assert_eq!(
            user_filter("mail", &["a@b".into()]),
            "(&(objectClass=user)(!(objectClass=computer))(mail=a@b))"
        );
        assert_eq!(
            user_filter("x", &["1".into(), "2*".into()]),
            "(&(objectClass=user)(!(objectClass=computer))(|(x=1)(x=2\\2a)))"
        );
    }
}
