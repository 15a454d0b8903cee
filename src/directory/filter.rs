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

use super::Condition;

/// `(&(objectClass=user)(!(objectClass=computer))(|…))` for users, `(&(objectClass=computer)(|…))`
/// for computers, OR-ed when both are asked for.
pub fn lookup_filter(user: &[Condition], computer: &[Condition]) -> String {
    let users = kind_filter("(objectClass=user)(!(objectClass=computer))", user);
    let computers = kind_filter("(objectClass=computer)", computer);
    match (users, computers) {
        (Some(u), Some(c)) => format!("(|{u}{c})"),
        (Some(f), None) | (None, Some(f)) => f,
        // Matches nothing; never sent (an empty lookup is answered without searching).
        (None, None) => "(!(objectClass=*))".to_string(),
    }
}

fn kind_filter(class: &str, conditions: &[Condition]) -> Option<String> {
    if conditions.is_empty() {
        return None;
    }
    let mut out = format!("(&{class}");
    if conditions.len() > 1 {
        out.push_str("(|");
    }
    for c in conditions {
        let _ = write!(
            out,
            "({}={})",
            c.attribute,
            escape_value(c.value.as_bytes())
        );
    }
    if conditions.len() > 1 {
        out.push(')');
    }
    out.push(')');
    Some(out)
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
        let mail = [Condition::new("mail", "a@b")];
        assert_eq!(
            lookup_filter(&mail, &[]),
            "(&(objectClass=user)(!(objectClass=computer))(mail=a@b))"
        );
        let two = [Condition::new("x", "1"), Condition::new("y", "2*")];
        assert_eq!(
            lookup_filter(&two, &[]),
            "(&(objectClass=user)(!(objectClass=computer))(|(x=1)(y=2\\2a)))"
        );
        let host = [Condition::new("dNSHostName", "pc1.corp.test")];
        assert_eq!(
            lookup_filter(&mail, &host),
            "(|(&(objectClass=user)(!(objectClass=computer))(mail=a@b))(&(objectClass=computer)(dNSHostName=pc1.corp.test)))"
        );
    }
}
