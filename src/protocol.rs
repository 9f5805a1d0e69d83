//! The wire protocol of CONTRACT §4: parsing client commands (borrowing from
//! the frame, `data` kept as raw bytes), validating topics, and encoding server
//! frames. A message frame is encoded once per publish and shared.

use std::borrow::Cow;
use std::fmt::Write as _;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

/// Longest topic in bytes.
pub const MAX_TOPIC_LEN: usize = 256;

/// Deepest nesting of arrays/objects accepted in `data`: subscribers parse
/// it too, and many JSON parsers recurse (Python's stops near 1000).
pub const MAX_DATA_DEPTH: usize = 128;

/// Checks that a (syntactically valid) JSON value nests at most `max` deep.
pub fn depth_within(json: &str, max: usize) -> bool {
    // Nesting needs an opening bracket per level, so a value with at most
    // `max` of them (counting those inside strings too) is within bounds.
    // The count vectorises; it settles nearly every publish at a fraction of
    // the cost of the exact scan below (7 % of a publish-heavy broker's CPU).
    let opening = json.bytes().filter(|&b| b == b'[' || b == b'{').count();
    if opening <= max {
        return true;
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// Error codes of CONTRACT §4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Malformed JSON, unknown op, bad topic, binary frame.
    BadRequest,
    /// A per-connection limit was hit.
    Limit,
    /// Not permitted (CONTRACT §10).
    Forbidden,
    /// A token that does not verify (CONTRACT §10).
    Unauthorized,
    /// The broker failed.
    Internal,
}

impl ErrorCode {
    /// The code as sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Limit => "limit",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A request the client got wrong, answered with an error frame.
#[derive(Debug, Clone)]
pub struct Rejection<'a> {
    /// The request's id when one could be read.
    pub id: Option<&'a RawValue>,
    /// Error code.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub message: String,
}

/// A parsed client command, borrowing from the frame text.
#[derive(Debug, Clone)]
pub enum Command<'a> {
    /// Add a subscription (pattern may contain wildcards).
    Subscribe {
        /// Pattern.
        topic: Cow<'a, str>,
        /// Request id.
        id: Option<&'a RawValue>,
    },
    /// Remove a subscription.
    Unsubscribe {
        /// Pattern.
        topic: Cow<'a, str>,
        /// Request id.
        id: Option<&'a RawValue>,
    },
    /// Publish `data` to a concrete topic.
    Publish {
        /// Topic (no wildcards).
        topic: Cow<'a, str>,
        /// The value exactly as the client sent it.
        data: &'a RawValue,
        /// Request id.
        id: Option<&'a RawValue>,
    },
    /// Present a token: the first authenticates, a later one refreshes (§10).
    Auth {
        /// The compact JWS, as sent (never logged).
        token: Cow<'a, str>,
        /// Request id.
        id: Option<&'a RawValue>,
    },
}

#[derive(Deserialize)]
struct RawCommand<'a> {
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow)]
    topic: Option<Cow<'a, str>>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    id: Option<&'a RawValue>,
}

/// Just the `id` of a command that failed to parse as a whole.
#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(default, borrow, deserialize_with = "present")]
    id: Option<&'a RawValue>,
}

/// `Some` whenever the field is present, `null` included (serde would read
/// a null into an `Option` as absent).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue as Deserialize>::deserialize(d).map(Some)
}

/// Checks a topic or pattern; `wildcards` allows `*` segments and a final `>`.
pub fn validate_topic(topic: &str, wildcards: bool) -> Result<(), String> {
    if topic.is_empty() {
        return Err("topic is empty".into());
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(format!("topic is longer than {MAX_TOPIC_LEN} bytes"));
    }
    let mut segments = topic.split('.').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        match seg {
            "" => return Err("topic has an empty segment".into()),
            "*" | ">" if !wildcards => {
                return Err("wildcards (`*`, `>`) are not allowed when publishing".into())
            }
            "*" => {}
            ">" if last => {}
            ">" => return Err("`>` is only allowed as the last segment".into()),
            _ => {
                if let Some(c) = seg
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':')))
                {
                    return Err(format!(
                        "topic segment `{}` has invalid character {c:?} (allowed: A-Z a-z 0-9 _ - :)",
                        seg.escape_default()
                    ));
                }
            }
        }
    }
    Ok(())
}

fn valid_id(id: Option<&RawValue>) -> bool {
    match id {
        None => true,
        Some(raw) => {
            let s = raw.get().as_bytes();
            matches!(s.first(), Some(b'"' | b'-' | b'0'..=b'9'))
        }
    }
}

/// The valid `id` of a frame, read without parsing the rest: for answering
/// a request that is refused before it is parsed (the inbound rate limit).
pub fn request_id(text: &str) -> Option<&RawValue> {
    serde_json::from_str::<IdOnly<'_>>(text)
        .ok()
        .and_then(|r| r.id)
        .filter(|id| valid_id(Some(id)))
}

/// Parses one text frame into a command, or the error to answer with.
pub fn parse_command(text: &str) -> Result<Command<'_>, Rejection<'_>> {
    let raw: RawCommand<'_> = serde_json::from_str(text).map_err(|e| {
        // Well-formed JSON with a mistyped or repeated field still gets its
        // `id` back (CONTRACT §4), read on its own from the same text.
        let id = request_id(text);
        let what = if e.is_data() {
            "invalid command"
        } else {
            "malformed JSON command"
        };
        Rejection {
            id,
            code: ErrorCode::BadRequest,
            message: format!("{what}: {e}"),
        }
    })?;
    let id = raw.id;
    let bad = |message: String| Rejection {
        id: if valid_id(id) { id } else { None },
        code: ErrorCode::BadRequest,
        message,
    };
    if !valid_id(id) {
        return Err(bad("`id` must be a string or a number".into()));
    }
    let op = raw.op.ok_or_else(|| bad("missing `op`".into()))?;
    if op == "auth" {
        if raw.topic.is_some() || raw.data.is_some() {
            return Err(bad(
                "`topic` and `data` are not allowed with op `auth`".into()
            ));
        }
        let token = raw.token.ok_or_else(|| bad("missing `token`".into()))?;
        return Ok(Command::Auth { token, id });
    }
    if raw.token.is_some() {
        return Err(bad(format!("`token` is not allowed with op `{op}`")));
    }
    let topic = raw.topic.ok_or_else(|| bad("missing `topic`".into()))?;
    match op.as_ref() {
        "subscribe" | "unsubscribe" => {
            validate_topic(&topic, true).map_err(bad)?;
            if raw.data.is_some() {
                return Err(bad(format!("`data` is not allowed with op `{op}`")));
            }
            Ok(if op == "subscribe" {
                Command::Subscribe { topic, id }
            } else {
                Command::Unsubscribe { topic, id }
            })
        }
        "publish" => {
            validate_topic(&topic, false).map_err(bad)?;
            let data = raw.data.ok_or_else(|| bad("missing `data`".into()))?;
            if !depth_within(data.get(), MAX_DATA_DEPTH) {
                return Err(bad(format!(
                    "`data` nests deeper than {MAX_DATA_DEPTH} levels"
                )));
            }
            Ok(Command::Publish { topic, data, id })
        }
        other => Err(bad(format!(
            "unknown op `{}` (expected subscribe, unsubscribe, publish or auth)",
            other.escape_default()
        ))),
    }
}

/// Encodes the message frame every subscriber receives (built once per publish).
pub fn encode_message(topic: &str, data: &str) -> String {
    // Topics are validated to need no JSON escaping.
    [MESSAGE_HEAD, topic, MESSAGE_MID, data, "}"].concat()
}

/// The message frame's JSON around the topic and the data: one layout for
/// [`encode_message`] and [`message_frame`].
const MESSAGE_HEAD: &str = r#"{"type":"message","topic":""#;
const MESSAGE_MID: &str = r#"","data":"#;

/// Length of the WebSocket header of an unmasked server frame with this payload.
fn header_len(payload: usize) -> usize {
    match payload {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Appends the header of an unmasked, final server frame (RFC 6455 §5.2).
fn push_header(out: &mut Vec<u8>, opcode: u8, payload: usize) {
    out.push(0x80 | opcode);
    match payload {
        0..=125 => out.push(payload as u8),
        126..=65535 => {
            out.push(126);
            out.extend_from_slice(&(payload as u16).to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(payload as u64).to_be_bytes());
        }
    }
}

/// A complete WebSocket text frame (header + payload) ready for the socket.
/// Server frames are not masked, so one frame serves every subscriber.
pub fn text_frame(text: &str) -> Bytes {
    let mut out = Vec::with_capacity(header_len(text.len()) + text.len());
    push_header(&mut out, 0x1, text.len());
    out.extend_from_slice(text.as_bytes());
    Bytes::from(out)
}

/// Payload length of a complete server text frame (0 for any other frame),
/// for the WebSocket payload byte counters.
pub fn text_payload_len(frame: &[u8]) -> usize {
    match frame {
        [0x81, len, ..] => frame.len() - header_len_from(*len),
        _ => 0,
    }
}

fn header_len_from(len_byte: u8) -> usize {
    match len_byte & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    }
}

/// A complete Ping frame with an empty payload.
pub fn ping_frame() -> Bytes {
    Bytes::from_static(&[0x89, 0x00])
}

/// A complete Close frame with a code and a (short, UTF-8) reason.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    // Control frames carry at most 125 bytes: 2 for the code, the rest reason.
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut out = Vec::with_capacity(4 + reason.len());
    push_header(&mut out, 0x8, 2 + reason.len());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason);
    Bytes::from(out)
}

/// The framed message every subscriber receives, built once per publish in
/// one allocation: `{"type":"message","topic":…,"data":<raw>}`.
pub fn message_frame(topic: &str, data: &str) -> Bytes {
    // Topics are validated to need no JSON escaping.
    let payload = MESSAGE_HEAD.len() + topic.len() + MESSAGE_MID.len() + data.len() + 1;
    let mut out = Vec::with_capacity(header_len(payload) + payload);
    push_header(&mut out, 0x1, payload);
    out.extend_from_slice(MESSAGE_HEAD.as_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(MESSAGE_MID.as_bytes());
    out.extend_from_slice(data.as_bytes());
    out.push(b'}');
    Bytes::from(out)
}

/// Encodes an ack for request `id`.
pub fn encode_ack(id: &RawValue) -> String {
    format!(r#"{{"type":"ack","id":{}}}"#, id.get())
}

/// Encodes the ack of an `auth` op: the token's `exp` (Unix seconds), when known.
pub fn encode_auth_ack(id: &RawValue, exp: Option<u64>) -> String {
    match exp {
        Some(exp) => format!(r#"{{"type":"ack","id":{},"exp":{exp}}}"#, id.get()),
        None => encode_ack(id),
    }
}

/// Encodes the notice that the server removed a subscription (§10: a
/// refresh whose permissions no longer cover it).
pub fn encode_unsubscribed(topic: &str, reason: &str) -> String {
    // Topics are validated to need no JSON escaping; reasons are ours.
    format!(r#"{{"type":"unsubscribed","topic":"{topic}","reason":"{reason}"}}"#)
}

/// Encodes an error frame.
pub fn encode_error(id: Option<&RawValue>, code: ErrorCode, message: &str) -> String {
    let mut out = String::with_capacity(64 + message.len());
    out.push_str(r#"{"type":"error","#);
    if let Some(id) = id {
        let _ = write!(out, r#""id":{},"#, id.get());
    }
    let _ = write!(
        out,
        r#""code":"{}","message":{}}}"#,
        code.as_str(),
        serde_json::Value::String(message.to_string())
    );
    out
}

/// The body of the admin `POST /publish`.
#[derive(Deserialize)]
pub struct HttpPublish<'a> {
    /// Topic (no wildcards).
    #[serde(borrow)]
    pub topic: Cow<'a, str>,
    /// The value to deliver, verbatim.
    #[serde(borrow)]
    pub data: &'a RawValue,
}

/// The raw `data` bytes inside a frame built by [`message_frame`] for
/// `topic`, sliced without a copy (what the cluster sends to NATS).
pub fn message_frame_data(frame: &Bytes, topic: &str) -> Bytes {
    let header = header_len_from(frame.get(1).copied().unwrap_or(0));
    let start = header + MESSAGE_HEAD.len() + topic.len() + MESSAGE_MID.len();
    let end = frame.len().saturating_sub(1);
    if start > end {
        return Bytes::new();
    }
    frame.slice(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_ops() {
        let c = parse_command(r#"{"op":"subscribe","topic":"chat.*","id":1}"#).expect("ok");
        assert!(
            matches!(c, Command::Subscribe { ref topic, id: Some(id) } if topic == "chat.*" && id.get() == "1")
        );
        let c = parse_command(r#"{"op":"unsubscribe","topic":"a.>"}"#).expect("ok");
        assert!(matches!(c, Command::Unsubscribe { id: None, .. }));
        let c = parse_command(r#"{"op":"publish","topic":"a.b","data":{ "x" : [1, 2] },"id":"q"}"#)
            .expect("ok");
        match c {
            Command::Publish { topic, data, id } => {
                assert_eq!(topic, "a.b");
                assert_eq!(data.get(), r#"{ "x" : [1, 2] }"#);
                assert_eq!(id.map(|i| i.get()), Some(r#""q""#));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_auth_and_refuses_stray_fields() {
        match parse_command(r#"{"op":"auth","token":"a.b.c","id":4}"#) {
            Ok(Command::Auth { token, id }) => {
                assert_eq!(token, "a.b.c");
                assert_eq!(id.map(|i| i.get()), Some("4"));
            }
            other => panic!("{other:?}"),
        }
        let r = parse_command(r#"{"op":"auth","id":4}"#).expect_err("no token");
        assert!(r.message.contains("`token`"), "{}", r.message);
        assert_eq!(r.id.map(|i| i.get()), Some("4"));
        let r = parse_command(r#"{"op":"auth","token":"t","topic":"a"}"#).expect_err("topic");
        assert_eq!(r.code, ErrorCode::BadRequest);
        let r = parse_command(r#"{"op":"subscribe","topic":"a","token":"t","id":1}"#)
            .expect_err("token on subscribe");
        assert!(r.message.contains("`token`"), "{}", r.message);
        assert_eq!(
            encode_auth_ack(&RawValue::from_string("1".into()).unwrap(), Some(17)),
            r#"{"type":"ack","id":1,"exp":17}"#
        );
        assert_eq!(
            encode_unsubscribed("chat.>", "forbidden"),
            r#"{"type":"unsubscribed","topic":"chat.>","reason":"forbidden"}"#
        );
    }

    #[test]
    fn null_data_is_present_and_null_id_is_refused() {
        match parse_command(r#"{"op":"publish","topic":"a","data":null}"#) {
            Ok(Command::Publish { data, .. }) => assert_eq!(data.get(), "null"),
            other => panic!("{other:?}"),
        }
        let r = parse_command(r#"{"op":"subscribe","topic":"a","id":null}"#).expect_err("null id");
        assert!(r.message.contains("`id`"));
    }

    #[test]
    fn rejections_keep_the_id() {
        let r =
            parse_command(r#"{"op":"publish","topic":"a.*","data":1,"id":7}"#).expect_err("wild");
        assert_eq!(r.code, ErrorCode::BadRequest);
        assert_eq!(r.id.map(|i| i.get()), Some("7"));
        let r = parse_command(r#"{"op":"dance","topic":"a","id":"x"}"#).expect_err("op");
        assert!(r.message.contains("unknown op"));
        let r = parse_command("{not json").expect_err("json");
        assert!(r.id.is_none());
        let r = parse_command(r#"{"op":"subscribe","topic":"a","id":{"o":1}}"#).expect_err("id");
        assert!(r.id.is_none());
        let r = parse_command(r#"{"op":"subscribe","op":"publish","topic":"a"}"#).expect_err("dup");
        assert!(r.message.contains("duplicate"));
        // Mistyped or repeated fields in well-formed JSON keep the id,
        // wherever it sits.
        for (text, id) in [
            (r#"{"op":"subscribe","topic":5,"id":27}"#, "27"),
            (r#"{"id":35,"op":"subscribe","topic":5}"#, "35"),
            (r#"{"op":5,"topic":"a","id":"x"}"#, r#""x""#),
            (r#"{"op":"subscribe","topic":["a"],"id":1.5}"#, "1.5"),
            (
                r#"{"op":"subscribe","op":"publish","topic":"a","id":3}"#,
                "3",
            ),
        ] {
            let r = parse_command(text).expect_err(text);
            assert_eq!(r.code, ErrorCode::BadRequest, "{text}");
            assert_eq!(r.id.map(|i| i.get()), Some(id), "{text}");
        }
        let r = parse_command(r#"{"op":"subscribe","topic":5,"id":27}"#).expect_err("type");
        assert!(r.message.starts_with("invalid command: "), "{}", r.message);
        // Unusable ids are still left out.
        for text in [
            r#"{"op":5,"id":null}"#,
            r#"{"op":5,"id":[1]}"#,
            r#"{"op":5,"id":1,"id":2}"#,
            r#"[1,2]"#,
            r#"{"op":"subscribe","topic":"a","id":7"#,
        ] {
            assert!(parse_command(text).expect_err(text).id.is_none(), "{text}");
        }
    }

    #[test]
    fn topic_rules() {
        for ok in ["a", "a.b", "A-z_0:9.x", "a.*.c", "a.>", ">", "*"] {
            assert!(validate_topic(ok, true).is_ok(), "{ok}");
        }
        for bad in [
            "", ".", "a.", ".a", "a..b", "a.>.b", "a b", "a/b", "é", "a.b*", "a>",
        ] {
            assert!(validate_topic(bad, true).is_err(), "{bad}");
        }
        assert!(validate_topic("a.*", false).is_err());
        assert!(validate_topic(&"a".repeat(256), false).is_ok());
        assert!(validate_topic(&"a".repeat(257), false).is_err());
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!(
            r#"{{"op":"publish","topic":"a","data":{}1{}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let r = parse_command(&deep).expect_err("too deep");
        assert_eq!(r.code, ErrorCode::BadRequest);
    }

    #[test]
    fn depth_limit_is_exact_at_the_boundary_and_ignores_strings() {
        let nested = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        assert!(depth_within(&nested(MAX_DATA_DEPTH), MAX_DATA_DEPTH));
        assert!(!depth_within(&nested(MAX_DATA_DEPTH + 1), MAX_DATA_DEPTH));
        // More brackets than the limit, all but two inside strings: the
        // exact scan decides, not the bracket count.
        let in_strings = format!(r#"[{{"k":"{}"}}]"#, "[{".repeat(MAX_DATA_DEPTH));
        assert!(depth_within(&in_strings, MAX_DATA_DEPTH));
        let objects = format!(
            "{}1{}",
            r#"{"a":"#.repeat(MAX_DATA_DEPTH + 1),
            "}".repeat(MAX_DATA_DEPTH + 1)
        );
        assert!(!depth_within(&objects, MAX_DATA_DEPTH));
    }

    #[test]
    fn depth_is_counted_outside_strings_only() {
        assert!(depth_within(r#"[[["[[[[\"]]"]]]"#, 3));
        assert!(!depth_within("[[[[1]]]]", 3));
        assert!(depth_within(r#"{"a":{"b":[1]}}"#, 3));
        let ok = format!(
            "{}1{}",
            "[".repeat(MAX_DATA_DEPTH),
            "]".repeat(MAX_DATA_DEPTH)
        );
        assert!(parse_command(&format!(r#"{{"op":"publish","topic":"a","data":{ok}}}"#)).is_ok());
    }

    #[test]
    fn frames_have_rfc6455_headers() {
        let f = message_frame("a.b", "1");
        let text = encode_message("a.b", "1");
        assert_eq!(f[0], 0x81);
        assert_eq!(f[1] as usize, text.len());
        assert_eq!(&f[2..], text.as_bytes());
        let long = "x".repeat(300);
        let f = text_frame(&long);
        assert_eq!(&f[..4], &[0x81, 126, 0x01, 0x2c]);
        assert_eq!(f.len(), 304);
        let huge = "y".repeat(70_000);
        let f = text_frame(&huge);
        assert_eq!(f[1], 127);
        assert_eq!(
            u64::from_be_bytes(f[2..10].try_into().expect("8 bytes")),
            70_000
        );
        assert_eq!(
            &close_frame(1001, "idle timeout")[..4],
            &[0x88, 14, 0x03, 0xe9]
        );
        assert_eq!(&ping_frame()[..], &[0x89, 0]);
        assert_eq!(text_payload_len(&text_frame(&long)), 300);
        assert_eq!(text_payload_len(&text_frame(&huge)), 70_000);
        assert_eq!(
            text_payload_len(&message_frame("a", "1")),
            encode_message("a", "1").len()
        );
        assert_eq!(text_payload_len(&ping_frame()), 0);
    }

    #[test]
    fn encodes_frames() {
        assert_eq!(
            encode_message("a.b", r#"{"x":1}"#),
            r#"{"type":"message","topic":"a.b","data":{"x":1}}"#
        );
        let id = RawValue::from_string("5".into()).expect("raw");
        assert_eq!(encode_ack(&id), r#"{"type":"ack","id":5}"#);
        let e = encode_error(Some(&id), ErrorCode::Limit, "too \"many\"");
        let v: serde_json::Value = serde_json::from_str(&e).expect("json");
        assert_eq!(v["code"], "limit");
        assert_eq!(v["id"], 5);
        assert_eq!(v["message"], "too \"many\"");
    }

    #[test]
    fn frame_data_is_the_raw_data() {
        for data in [
            "1",
            r#"{"a":[1,2]}"#,
            &format!("\"{}\"", "x".repeat(70_000)),
            &format!("\"{}\"", "y".repeat(200)),
        ] {
            let f = message_frame("a.b", data);
            assert_eq!(&message_frame_data(&f, "a.b")[..], data.as_bytes());
        }
    }
}
