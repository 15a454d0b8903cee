//! Security identifiers: the binary `objectSid` and the textual `S-1-5-21-…` form.

/// Binary SID → `S-R-I-S…`; `None` for a malformed value.
pub fn sid_to_text(bytes: &[u8]) -> Option<String> {
    let (&revision, rest) = bytes.split_first()?;
    let (&count, rest) = rest.split_first()?;
    if rest.len() != 6 + 4 * count as usize {
        return None;
    }
    let authority = rest[..6].iter().fold(0u64, |acc, b| (acc << 8) | *b as u64);
    let mut text = format!("S-{revision}-{authority}");
    for chunk in rest[6..].chunks_exact(4) {
        let sub = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        text.push_str(&format!("-{sub}"));
    }
    Some(text)
}

/// `S-R-I-S…` → binary SID; `None` for anything that is not a well-formed SID.
pub fn sid_from_text(text: &str) -> Option<Vec<u8>> {
    let mut parts = text
        .strip_prefix("S-")
        .or_else(|| text.strip_prefix("s-"))?
        .split('-');
    let revision: u8 = parts.next()?.parse().ok()?;
    let authority: u64 = parts.next()?.parse().ok()?;
    if authority >= 1 << 48 {
        return None;
    }
    let subs: Vec<u32> = parts.map(|p| p.parse().ok()).collect::<Option<_>>()?;
    if subs.is_empty() || subs.len() > 15 {
        return None;
    }
    let mut out = vec![revision, subs.len() as u8];
    out.extend_from_slice(&authority.to_be_bytes()[2..]);
    for sub in subs {
        out.extend_from_slice(&sub.to_le_bytes());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let text = "S-1-5-21-3623811015-3361044348-30300820-1013";
        let bytes = sid_from_text(text).unwrap();
        assert_eq!(bytes[..8], [1, 5, 0, 0, 0, 0, 0, 5]);
        assert_eq!(sid_to_text(&bytes).as_deref(), Some(text));
        for bad in [
            "S-1",
            "S-1-5",
            "X-1-5-21",
            "S-1-5-21-x",
            "S-1-281474976710656-1",
            "",
        ] {
            assert_eq!(sid_from_text(bad), None, "{bad}");
        }
        assert_eq!(sid_to_text(&[1, 2, 0, 0, 0, 0, 0, 5, 1, 0, 0]), None);
    }
}
