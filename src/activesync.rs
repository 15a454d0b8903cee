//! The ActiveSync request as seg understands it (MS-ASHTTP 2.2.1.1.1): the command, the
//! mailbox and the device, from either query form, plus the protocol headers.
//!
//! Plain form: `?Cmd=Sync&User=alice&DeviceId=ABC&DeviceType=iPhone&…`. Base64 form (12.1+):
//! `?<base64>` holding protocol version, command code, locale, DeviceId, policy key,
//! DeviceType and tagged parameters, where `User` is optional. Malformed input of either
//! form is a `QueryError` (400), never a panic.

use base64::Engine as _;
use http::HeaderMap;

/// An ActiveSync command; unknown names are kept, not rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Sync,
    SendMail,
    SmartForward,
    SmartReply,
    GetAttachment,
    GetHierarchy,
    CreateCollection,
    DeleteCollection,
    MoveCollection,
    FolderSync,
    FolderCreate,
    FolderDelete,
    FolderUpdate,
    MoveItems,
    GetItemEstimate,
    MeetingResponse,
    Search,
    Settings,
    Ping,
    ItemOperations,
    Provision,
    ResolveRecipients,
    ValidateCert,
    Find,
    Unknown(String),
}

/// Commands by base64 command code (MS-ASHTTP 2.2.1.1.1.1.2), which is also the name order.
const BY_CODE: [(u8, &str); 24] = [
    (0, "Sync"),
    (1, "SendMail"),
    (2, "SmartForward"),
    (3, "SmartReply"),
    (4, "GetAttachment"),
    (5, "GetHierarchy"),
    (6, "CreateCollection"),
    (7, "DeleteCollection"),
    (8, "MoveCollection"),
    (9, "FolderSync"),
    (10, "FolderCreate"),
    (11, "FolderDelete"),
    (12, "FolderUpdate"),
    (13, "MoveItems"),
    (14, "GetItemEstimate"),
    (15, "MeetingResponse"),
    (16, "Search"),
    (17, "Settings"),
    (18, "Ping"),
    (19, "ItemOperations"),
    (20, "Provision"),
    (21, "ResolveRecipients"),
    (22, "ValidateCert"),
    (23, "Find"),
];

impl Command {
    /// From a `Cmd=` value, case-insensitively.
    pub fn from_name(name: &str) -> Command {
        match BY_CODE.iter().find(|(_, n)| n.eq_ignore_ascii_case(name)) {
            Some((code, _)) => Command::from_known_code(*code),
            None => Command::Unknown(name.to_string()),
        }
    }

    fn from_code(code: u8) -> Command {
        if BY_CODE.iter().any(|(c, _)| *c == code) {
            Command::from_known_code(code)
        } else {
            Command::Unknown(format!("code {code}"))
        }
    }

    fn from_known_code(code: u8) -> Command {
        use Command::*;
        match code {
            0 => Sync,
            1 => SendMail,
            2 => SmartForward,
            3 => SmartReply,
            4 => GetAttachment,
            5 => GetHierarchy,
            6 => CreateCollection,
            7 => DeleteCollection,
            8 => MoveCollection,
            9 => FolderSync,
            10 => FolderCreate,
            11 => FolderDelete,
            12 => FolderUpdate,
            13 => MoveItems,
            14 => GetItemEstimate,
            15 => MeetingResponse,
            16 => Search,
            17 => Settings,
            18 => Ping,
            19 => ItemOperations,
            20 => Provision,
            21 => ResolveRecipients,
            22 => ValidateCert,
            _ => Find,
        }
    }

    /// The command's name; the metric label, where unknown commands are `other`.
    pub fn name(&self) -> &str {
        match self {
            Command::Unknown(name) => name,
            known => BY_CODE
                .iter()
                .find(|(code, _)| Command::from_known_code(*code) == *known)
                .map(|(_, n)| *n)
                .unwrap_or("other"),
        }
    }

    /// A fixed label set for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Command::Unknown(_) => "other",
            known => BY_CODE
                .iter()
                .find(|(code, _)| Command::from_known_code(*code) == *known)
                .map(|(_, n)| *n)
                .unwrap_or("other"),
        }
    }

    /// Commands that hold the request open until something changes (up to 3540 s).
    pub fn is_long_poll(&self) -> bool {
        matches!(self, Command::Ping)
    }
}

/// The request headers an ActiveSync or Autodiscover request needs at the server, lowercase:
/// the only client headers seg forwards (with `upstream.forward_headers`). Sources, header by
/// header, in docs/security.md ("Headers forwarded"). `Content-Length` is seg's own to
/// write (the upstream client frames the body); `Authorization`, `Cookie` and every routing
/// or identity header are absent on purpose.
pub const REQUEST_HEADERS: [&str; 9] = [
    "accept",
    "accept-encoding",
    "accept-language",
    "content-length",
    "content-type",
    "ms-asacceptmultipart",
    "ms-asprotocolversion",
    "user-agent",
    "x-ms-policykey",
];

/// Headers seg reads, or a server reads, as one value: twice is ambiguous, so refused.
pub const SINGLE_VALUED_HEADERS: [&str; 5] = [
    "content-type",
    "ms-asacceptmultipart",
    "ms-asprotocolversion",
    "user-agent",
    "x-ms-policykey",
];

/// Which query form a request used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryForm {
    Plain,
    Base64,
    /// No query at all (OPTIONS, Autodiscover).
    None,
}

/// The ActiveSync facts of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EasRequest {
    pub form: QueryForm,
    pub command: Option<Command>,
    pub user: Option<String>,
    pub device_id: Option<String>,
    pub device_type: Option<String>,
    /// From the base64 form's first byte, else the `MS-ASProtocolVersion` header.
    pub protocol_version: Option<String>,
    pub locale: Option<u16>,
    pub policy_key: Option<u32>,
    pub user_agent: Option<String>,
    /// The command parameters (plain: other query keys; base64: tagged parameters).
    pub parameters: Vec<(String, String)>,
}

/// Why a query is malformed (the reason code of the 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("query-bad-escape")]
    BadEscape,
    #[error("query-bad-base64")]
    BadBase64,
    #[error("query-truncated")]
    Truncated,
    #[error("query-field-too-long")]
    FieldTooLong,
    #[error("query-bad-policy-key")]
    BadPolicyKey,
    #[error("query-bad-text")]
    BadText,
    #[error("query-missing-cmd")]
    MissingCommand,
    #[error("query-missing-device")]
    MissingDevice,
    #[error("query-duplicate-parameter")]
    DuplicateParameter,
    #[error("query-too-long")]
    TooLong,
    #[error("query-bad-key")]
    BadKey,
    #[error("query-bad-separator")]
    BadSeparator,
    #[error("query-bad-cmd")]
    BadCommand,
}

impl QueryError {
    /// The audit reason code.
    pub fn code(self) -> &'static str {
        match self {
            QueryError::BadEscape => "query-bad-escape",
            QueryError::BadBase64 => "query-bad-base64",
            QueryError::Truncated => "query-truncated",
            QueryError::FieldTooLong => "query-field-too-long",
            QueryError::BadPolicyKey => "query-bad-policy-key",
            QueryError::BadText => "query-bad-text",
            QueryError::MissingCommand => "query-missing-cmd",
            QueryError::MissingDevice => "query-missing-device",
            QueryError::DuplicateParameter => "query-duplicate-parameter",
            QueryError::TooLong => "query-too-long",
            QueryError::BadKey => "query-bad-key",
            QueryError::BadSeparator => "query-bad-separator",
            QueryError::BadCommand => "query-bad-cmd",
        }
    }
}

/// Longest query accepted, in bytes.
const MAX_QUERY: usize = 4096;
/// Longest DeviceId, DeviceType or parameter value (the base64 form's lengths are one byte).
const MAX_FIELD: usize = 255;

/// Base64 parameter tags (MS-ASHTTP 2.2.1.1.1.1.3).
fn tag_name(tag: u8) -> String {
    match tag {
        0 => "AttachmentName".into(),
        1 => "CollectionId".into(),
        2 => "CollectionName".into(),
        3 => "ItemId".into(),
        4 => "LongId".into(),
        5 => "ParentId".into(),
        6 => "Occurrence".into(),
        7 => "Options".into(),
        8 => "User".into(),
        other => format!("Tag{other}"),
    }
}

impl EasRequest {
    /// Reads an ActiveSync request from its query and headers. `require_command` is set for
    /// `POST /Microsoft-Server-ActiveSync`, where Cmd, DeviceId and DeviceType are mandatory.
    pub fn parse(
        query: Option<&str>,
        headers: &HeaderMap,
        require_command: bool,
    ) -> Result<EasRequest, QueryError> {
        let mut request = match query.filter(|q| !q.is_empty()) {
            None => EasRequest::empty(QueryForm::None),
            Some(q) if q.len() > MAX_QUERY => return Err(QueryError::TooLong),
            Some(q) if looks_like_base64(q) => parse_base64(q)?,
            Some(q) => parse_plain(q)?,
        };
        request.read_headers(headers);
        if require_command {
            if request.command.is_none() {
                return Err(QueryError::MissingCommand);
            }
            if request.device_id.is_none() || request.device_type.is_none() {
                return Err(QueryError::MissingDevice);
            }
        }
        Ok(request)
    }

    /// The protocol headers alone, for a request whose query could not be read.
    pub fn headers_only(headers: &HeaderMap) -> EasRequest {
        let mut request = EasRequest::empty(QueryForm::None);
        request.read_headers(headers);
        request
    }

    fn read_headers(&mut self, headers: &HeaderMap) {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        if self.protocol_version.is_none() {
            self.protocol_version = header("ms-asprotocolversion");
        }
        if self.policy_key.is_none() {
            self.policy_key = header("x-ms-policykey").and_then(|k| k.trim().parse().ok());
        }
        self.user_agent = header("user-agent");
    }

    fn empty(form: QueryForm) -> EasRequest {
        EasRequest {
            form,
            command: None,
            user: None,
            device_id: None,
            device_type: None,
            protocol_version: None,
            locale: None,
            policy_key: None,
            user_agent: None,
            parameters: Vec::new(),
        }
    }

    /// The metric label of the command: a fixed set, `other` for unknown, `none` when absent.
    pub fn command_label(&self) -> &'static str {
        self.command.as_ref().map(Command::label).unwrap_or("none")
    }

    /// The command's name for the audit log.
    pub fn command_name(&self) -> &str {
        self.command.as_ref().map(Command::name).unwrap_or("")
    }

    pub fn is_long_poll(&self) -> bool {
        self.command.as_ref().is_some_and(Command::is_long_poll)
    }
}

/// A base64 query has no `=` except as trailing padding, and no `&`.
fn looks_like_base64(q: &str) -> bool {
    let mut body = q;
    loop {
        let trimmed = body
            .trim_end_matches('=')
            .trim_end_matches("%3D")
            .trim_end_matches("%3d");
        if trimmed.len() == body.len() {
            break;
        }
        body = trimmed;
    }
    !body.contains('=') && !body.contains('&')
}

/// The plain form, read so that no other parser can find a key seg did not see: PHP trims
/// and drops `[]`, turns `.` and spaces into `_` and splits on `;` when configured to;
/// ASP.NET decodes keys and compares them case-insensitively; Unicode case folding turns
/// `ſ` into `s`. So keys are raw ASCII letters and digits only (never escaped), `;` is no
/// separator and no character, and `Cmd` is letters only, so the command seg caps is the
/// command the upstream runs.
fn parse_plain(query: &str) -> Result<EasRequest, QueryError> {
    if query.contains(';') {
        return Err(QueryError::BadSeparator);
    }
    let mut request = EasRequest::empty(QueryForm::Plain);
    // The keys seg decides on, seen: a second one is refused even after an empty first
    // (`User=&User=bob`: ASP.NET reads `,bob`, a first-value parser an empty name).
    let mut seen = [false; 3];
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(QueryError::BadKey);
        }
        let value = percent_decode(raw_value)?;
        if value.len() > MAX_FIELD {
            return Err(QueryError::FieldTooLong);
        }
        // Keys are matched case-insensitively, as ASP.NET (and so Exchange) reads them: a
        // `user=` next to `User=` must not slip past the mailbox binding.
        let (slot, index) = match key.to_ascii_lowercase().as_str() {
            "cmd" => {
                if request.command.is_some() {
                    return Err(QueryError::DuplicateParameter);
                }
                if raw_value.is_empty() || !raw_value.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return Err(QueryError::BadCommand);
                }
                request.command = Some(Command::from_name(raw_value));
                continue;
            }
            "user" => (&mut request.user, 0),
            "deviceid" => (&mut request.device_id, 1),
            "devicetype" => (&mut request.device_type, 2),
            _ => {
                request.parameters.push((key.to_string(), value));
                continue;
            }
        };
        // Two values for one identity-bearing key would let a proxy and a server disagree.
        if std::mem::replace(&mut seen[index], true) {
            return Err(QueryError::DuplicateParameter);
        }
        *slot = Some(value).filter(|v| !v.is_empty());
    }
    Ok(request)
}

fn parse_base64(query: &str) -> Result<EasRequest, QueryError> {
    let text = percent_decode(query)?;
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| QueryError::BadBase64)?;
    let mut input = Reader(&bytes);
    let mut request = EasRequest::empty(QueryForm::Base64);
    let version = input.byte()?;
    request.protocol_version = Some(format!("{}.{}", version / 10, version % 10));
    request.command = Some(Command::from_code(input.byte()?));
    let locale = input.take(2)?;
    request.locale = Some(u16::from_le_bytes([locale[0], locale[1]]));
    request.device_id = Some(input.text()?).filter(|d| !d.is_empty());
    let key_length = input.byte()?;
    request.policy_key = match key_length {
        0 => None,
        4 => {
            let k = input.take(4)?;
            Some(u32::from_le_bytes([k[0], k[1], k[2], k[3]]))
        }
        _ => return Err(QueryError::BadPolicyKey),
    };
    request.device_type = Some(input.text()?).filter(|d| !d.is_empty());
    let mut user_seen = false;
    while !input.0.is_empty() {
        let tag = input.byte()?;
        if tag == 8 {
            // The mailbox is text: no hex fallback another parser would read otherwise.
            let value = input.text()?;
            if std::mem::replace(&mut user_seen, true) {
                return Err(QueryError::DuplicateParameter);
            }
            request.user = Some(value).filter(|v| !v.is_empty());
            continue;
        }
        let value = input.text_or_hex(tag)?;
        request.parameters.push((tag_name(tag), value));
    }
    Ok(request)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, QueryError> {
        let (&b, rest) = self.0.split_first().ok_or(QueryError::Truncated)?;
        self.0 = rest;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], QueryError> {
        if self.0.len() < n {
            return Err(QueryError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    /// A length-prefixed UTF-8 string without control characters.
    fn text(&mut self) -> Result<String, QueryError> {
        let n = self.byte()? as usize;
        let bytes = self.take(n)?;
        let text = std::str::from_utf8(bytes).map_err(|_| QueryError::BadText)?;
        if text.chars().any(char::is_control) {
            return Err(QueryError::BadText);
        }
        Ok(text.to_string())
    }

    /// A tagged value: text for names and ids, hex for binary ones (Options, LongId bytes).
    fn text_or_hex(&mut self, tag: u8) -> Result<String, QueryError> {
        let n = self.byte()? as usize;
        let bytes = self.take(n)?;
        match (tag, std::str::from_utf8(bytes)) {
            (7, _) | (_, Err(_)) => Ok(crate::identity::hex(bytes)),
            (_, Ok(text)) if text.chars().any(char::is_control) => Err(QueryError::BadText),
            (_, Ok(text)) => Ok(text.to_string()),
        }
    }
}

/// Percent-encodes a query value: RFC 3986's unreserved characters stay, every other byte
/// is `%XX` (what `percent_decode` reads back).
pub fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Decodes `%xx` and `+`; refuses a broken escape, invalid UTF-8 or a control character.
pub fn percent_decode(value: &str) -> Result<String, QueryError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(QueryError::BadEscape)?;
                let hex = std::str::from_utf8(hex).map_err(|_| QueryError::BadEscape)?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| QueryError::BadEscape)?);
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
    let text = String::from_utf8(out).map_err(|_| QueryError::BadText)?;
    if text.chars().any(char::is_control) {
        return Err(QueryError::BadText);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(query: &str) -> Result<EasRequest, QueryError> {
        EasRequest::parse(Some(query), &HeaderMap::new(), true)
    }

    #[test]
    fn plain_query() {
        let r =
            parse("Cmd=Sync&User=CORP%5Calice&DeviceId=ABC123&DeviceType=iPhone&CollectionId=5")
                .unwrap();
        assert_eq!(r.form, QueryForm::Plain);
        assert_eq!(r.command, Some(Command::Sync));
        assert_eq!(r.user.as_deref(), Some("CORP\\alice"));
        assert_eq!(r.device_id.as_deref(), Some("ABC123"));
        assert_eq!(r.device_type.as_deref(), Some("iPhone"));
        assert_eq!(
            r.parameters,
            [("CollectionId".to_string(), "5".to_string())]
        );
        assert_eq!(r.command_label(), "Sync");
    }

    #[test]
    fn keys_are_case_insensitive() {
        let r = parse("cmd=Sync&USER=bob&deviceid=D&DEVICETYPE=iPhone").unwrap();
        assert_eq!(r.user.as_deref(), Some("bob"));
        assert_eq!(r.device_id.as_deref(), Some("D"));
    }

    #[test]
    fn every_command_name_round_trips() {
        for (code, name) in BY_CODE {
            let c = Command::from_name(name);
            assert_eq!(c.name(), name);
            assert_eq!(c.label(), name);
            assert_eq!(Command::from_code(code), c);
            assert_eq!(
                Command::from_name(&name.to_lowercase()),
                c,
                "names are case-insensitive"
            );
        }
        let unknown = Command::from_name("Teleport");
        assert_eq!(unknown, Command::Unknown("Teleport".into()));
        assert_eq!(unknown.label(), "other");
        assert_eq!(Command::from_code(99).label(), "other");
    }

    #[test]
    fn the_specification_base64_example() {
        let r = parse("jAAJBAp2MTQwRGV2aWNlAApTbWFydFBob25l").unwrap();
        assert_eq!(r.form, QueryForm::Base64);
        assert_eq!(r.protocol_version.as_deref(), Some("14.0"));
        assert_eq!(r.command, Some(Command::Sync));
        assert_eq!(r.locale, Some(0x0409));
        assert_eq!(r.device_id.as_deref(), Some("v140Device"));
        assert_eq!(r.policy_key, None);
        assert_eq!(r.device_type.as_deref(), Some("SmartPhone"));
        assert_eq!(r.user, None, "User is optional in the base64 form");
    }

    fn base64_query(fields: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(fields)
    }

    #[test]
    fn base64_with_policy_key_user_and_parameters() {
        let mut bytes = vec![
            141, 18, 0x09, 0x04, 3, b'D', b'E', b'V', 4, 1, 0, 0, 0, 3, b'W', b'P', b'8',
        ];
        bytes.extend([8, 5, b'a', b'l', b'i', b'c', b'e', 7, 1, 0x01, 1, 1, b'5']);
        let query = base64_query(&bytes)
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D");
        let r = parse(&query).unwrap();
        assert_eq!(r.protocol_version.as_deref(), Some("14.1"));
        assert_eq!(r.command, Some(Command::Ping));
        assert_eq!(r.policy_key, Some(1));
        assert_eq!(r.device_type.as_deref(), Some("WP8"));
        assert_eq!(r.user.as_deref(), Some("alice"));
        assert_eq!(
            r.parameters,
            [
                ("Options".to_string(), "01".to_string()),
                ("CollectionId".to_string(), "5".to_string())
            ]
        );
    }

    #[test]
    fn malformed_queries_are_refused() {
        let rows: &[(&str, QueryError)] = &[
            ("Cmd=Sync&DeviceId=%zz&DeviceType=x", QueryError::BadEscape),
            ("Cmd=Sync&DeviceId=%4&DeviceType=x", QueryError::BadEscape),
            (
                "Cmd=Sync&DeviceId=a%0d%0aX&DeviceType=x",
                QueryError::BadText,
            ),
            ("Cmd=Sync&DeviceId=%ff&DeviceType=x", QueryError::BadText),
            (
                "Cmd=Sync&Cmd=Ping&DeviceId=a&DeviceType=x",
                QueryError::DuplicateParameter,
            ),
            (
                "Cmd=Sync&User=alice&User=bob&DeviceId=a&DeviceType=x",
                QueryError::DuplicateParameter,
            ),
            (
                "Cmd=Sync&User=&User=bob&DeviceId=a&DeviceType=x",
                QueryError::DuplicateParameter,
            ),
            (
                "Cmd=Sync&DeviceId=&DeviceId=a&DeviceType=x",
                QueryError::DuplicateParameter,
            ),
            (
                "User=alice&DeviceId=a&DeviceType=x",
                QueryError::MissingCommand,
            ),
            ("Cmd=Sync&User=alice", QueryError::MissingDevice),
            ("!!!notbase64", QueryError::BadBase64),
            // Keys other parsers read as User, Cmd or DeviceId.
            (
                "Cmd=Sync&%20User=bob&DeviceId=a&DeviceType=x",
                QueryError::BadKey,
            ),
            (
                "Cmd=Sync&+User=bob&DeviceId=a&DeviceType=x",
                QueryError::BadKey,
            ),
            (
                "Cmd=Sync&User%5B%5D=bob&DeviceId=a&DeviceType=x",
                QueryError::BadKey,
            ),
            (
                "Cmd=Sync&User[]=bob&DeviceId=a&DeviceType=x",
                QueryError::BadKey,
            ),
            (
                "Cmd=Sync&User.=bob&DeviceId=a&DeviceType=x",
                QueryError::BadKey,
            ),
            (
                "Cmd=Sync&U%C5%BFer=bob&DeviceId=a&DeviceType=x",
                QueryError::BadKey,
            ),
            (
                "Cmd=Sync&%55ser=bob&DeviceId=a&DeviceType=x",
                QueryError::BadKey,
            ),
            ("Cmd=Sync&=bob&DeviceId=a&DeviceType=x", QueryError::BadKey),
            ("Cmd=Sync&Device_Id=a&DeviceType=x", QueryError::BadKey),
            (
                "Cmd=Sync&;User=bob&DeviceId=a&DeviceType=x",
                QueryError::BadSeparator,
            ),
            (
                "Cmd=Sync;User=bob&DeviceId=a&DeviceType=x",
                QueryError::BadSeparator,
            ),
            (
                "Cmd=Sync&DeviceId=a%3Bb&DeviceType=x;",
                QueryError::BadSeparator,
            ),
            // Whatever the upstream would run as Ping is capped as Ping.
            (
                "Cmd=Ping%20&DeviceId=a&DeviceType=x",
                QueryError::BadCommand,
            ),
            (
                "Cmd=%20Ping&DeviceId=a&DeviceType=x",
                QueryError::BadCommand,
            ),
            ("Cmd=Ping+&DeviceId=a&DeviceType=x", QueryError::BadCommand),
            ("Cmd=P%69ng&DeviceId=a&DeviceType=x", QueryError::BadCommand),
            ("Cmd=&DeviceId=a&DeviceType=x", QueryError::BadCommand),
            ("jA", QueryError::Truncated),
        ];
        for (query, expected) in rows {
            assert_eq!(parse(query), Err(*expected), "{query}");
        }
        // Truncated and oversized base64 fields.
        let cases: &[(&[u8], QueryError)] = &[
            (&[140, 0, 9, 4, 10, b'v'], QueryError::Truncated),
            (&[140, 0, 9, 4, 0, 2, 1, 2], QueryError::BadPolicyKey),
            (
                &[140, 0, 9, 4, 0, 0, 1, b'x', 8, 9, b'a'],
                QueryError::Truncated,
            ),
            (
                &[140, 0, 9, 4, 2, 0xff, 0xfe, 0, 1, b'x'],
                QueryError::BadText,
            ),
            (&[140, 0, 9, 4, 1, b'\n', 0, 1, b'x'], QueryError::BadText),
            // A User that is not UTF-8 is refused, never read as hex.
            (
                &[140, 0, 9, 4, 0, 0, 1, b'x', 8, 2, 0xc3, 0x28],
                QueryError::BadText,
            ),
            (
                &[140, 0, 9, 4, 0, 0, 1, b'x', 8, 0, 8, 1, b'b'],
                QueryError::DuplicateParameter,
            ),
        ];
        for (bytes, expected) in cases {
            assert_eq!(parse(&base64_query(bytes)), Err(*expected), "{bytes:?}");
        }
        assert_eq!(parse(&"A".repeat(5000)), Err(QueryError::TooLong));
        let long = format!("Cmd=Sync&DeviceId={}&DeviceType=x", "a".repeat(300));
        assert_eq!(parse(&long), Err(QueryError::FieldTooLong));
    }

    #[test]
    fn protocol_headers_are_read() {
        let mut headers = HeaderMap::new();
        headers.insert("ms-asprotocolversion", "16.1".parse().unwrap());
        headers.insert("x-ms-policykey", "3942919513".parse().unwrap());
        headers.insert("user-agent", "Apple-iPhone9C1/1602.92".parse().unwrap());
        let r = EasRequest::parse(
            Some("Cmd=Ping&DeviceId=a&DeviceType=iPhone"),
            &headers,
            true,
        )
        .unwrap();
        assert_eq!(r.protocol_version.as_deref(), Some("16.1"));
        assert_eq!(r.policy_key, Some(3_942_919_513));
        assert_eq!(r.user_agent.as_deref(), Some("Apple-iPhone9C1/1602.92"));
        assert!(r.is_long_poll());
        let none = EasRequest::parse(None, &headers, false).unwrap();
        assert_eq!(none.form, QueryForm::None);
    }
}
