//! The ActiveSync request as seg sees it: the command and device named in the query.
//!
//! This reads the plain query form (`?Cmd=Sync&User=…&DeviceId=…&DeviceType=…`) for the
//! audit log and metrics; requests are forwarded whatever their query holds.

/// The fields of an ActiveSync query that the audit log records.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EasRequest {
    pub command: Option<String>,
    pub user: Option<String>,
    pub device_id: Option<String>,
    pub device_type: Option<String>,
}

/// Commands counted under their own name in metrics; anything else is `other`.
const KNOWN_COMMANDS: [&str; 25] = [
    "Autodiscover",
    "Find",
    "FolderCreate",
    "FolderDelete",
    "FolderSync",
    "FolderUpdate",
    "GetAttachment",
    "GetHierarchy",
    "GetItemEstimate",
    "ItemOperations",
    "MeetingResponse",
    "MoveItems",
    "Ping",
    "Provision",
    "ResolveRecipients",
    "Search",
    "SendMail",
    "Settings",
    "SmartForward",
    "SmartReply",
    "Sync",
    "ValidateCert",
    "Options",
    "Notify",
    "CreateCollection",
];

impl EasRequest {
    /// Reads the plain query form; unknown keys and undecodable values are ignored.
    pub fn from_query(query: Option<&str>) -> EasRequest {
        let mut request = EasRequest::default();
        for pair in query.unwrap_or("").split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let Some(value) = percent_decode(value) else {
                continue;
            };
            let slot = match key {
                "Cmd" => &mut request.command,
                "User" => &mut request.user,
                "DeviceId" => &mut request.device_id,
                "DeviceType" => &mut request.device_type,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(value);
            }
        }
        request
    }

    /// The metric label for the command: a fixed set, `other` for the rest, `none` when absent.
    pub fn command_label(&self) -> &'static str {
        match &self.command {
            None => "none",
            Some(c) => KNOWN_COMMANDS
                .iter()
                .find(|k| k.eq_ignore_ascii_case(c))
                .copied()
                .unwrap_or("other"),
        }
    }
}

/// Decodes `%xx` and `+`; `None` for a broken escape, invalid UTF-8 or a control character.
pub fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    let text = String::from_utf8(out).ok()?;
    if text.chars().any(char::is_control) {
        return None;
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_query() {
        let r = EasRequest::from_query(Some(
            "Cmd=Sync&User=CORP%5Calice&DeviceId=ABC123&DeviceType=iPhone&Cmd=Ping",
        ));
        assert_eq!(r.command.as_deref(), Some("Sync"));
        assert_eq!(r.user.as_deref(), Some("CORP\\alice"));
        assert_eq!(r.device_id.as_deref(), Some("ABC123"));
        assert_eq!(r.device_type.as_deref(), Some("iPhone"));
        assert_eq!(r.command_label(), "Sync");
        assert_eq!(
            EasRequest::from_query(Some("Cmd=Bogus")).command_label(),
            "other"
        );
        assert_eq!(EasRequest::from_query(None).command_label(), "none");
    }

    #[test]
    fn broken_escapes_are_dropped() {
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("a%0d%0ab"), None);
        assert_eq!(percent_decode("%c3%a9"), Some("é".into()));
    }
}
