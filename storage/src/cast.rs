//! Tolerant parsing of asciicast v2 as Tailscale clients send it (shared PROTOCOL.md 2.1–2.3).
//!
//! The header is kept as the JSON object that arrived: unknown keys stay, `null` reads as absent,
//! and integers keep full 64-bit precision (`srcNodeUserID` can exceed 2^53). Event times may be in
//! exponent form (`5e-07`). Kubernetes resize events carry `"HxW"`, height first.

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Map, Value};

/// Why a header line was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("first line is not JSON: {reason}")]
    NotJson { reason: String },
    #[error("first line is not a JSON object")]
    NotObject,
    #[error("header version is {found}, expected 2")]
    WrongVersion { found: String },
}

/// A parsed asciicast v2 header line.
#[derive(Debug, Clone, PartialEq)]
pub struct CastHeader {
    fields: Map<String, Value>,
}

impl CastHeader {
    /// Parses the first line of a recording (without or with its trailing newline).
    ///
    /// # Errors
    /// [`HeaderError`] when the line is not a JSON object with `"version": 2`.
    pub fn parse(line: &[u8]) -> Result<Self, HeaderError> {
        let value: Value =
            serde_json::from_slice(line.trim_ascii()).map_err(|e| HeaderError::NotJson {
                reason: e.to_string(),
            })?;
        Self::from_value(value)
    }

    /// Checks an already parsed header object (as kept in a manifest).
    ///
    /// # Errors
    /// [`HeaderError`] when it is not an object with `"version": 2`.
    pub fn from_value(value: Value) -> Result<Self, HeaderError> {
        let Value::Object(fields) = value else {
            return Err(HeaderError::NotObject);
        };
        match fields.get("version") {
            Some(v) if v.as_u64() == Some(2) => Ok(Self { fields }),
            Some(v) => Err(HeaderError::WrongVersion {
                found: v.to_string(),
            }),
            None => Err(HeaderError::WrongVersion {
                found: "nothing".to_owned(),
            }),
        }
    }

    /// The header object as received.
    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }

    pub fn into_value(self) -> Value {
        Value::Object(self.fields)
    }

    /// A string field; absent, `null` and non-string values read as `None`.
    pub fn str_field(&self, key: &str) -> Option<&str> {
        self.fields.get(key).and_then(Value::as_str)
    }

    /// Header `timestamp` (unix seconds), if present and integral.
    pub fn timestamp(&self) -> Option<i64> {
        self.fields.get("timestamp").and_then(Value::as_i64)
    }

    /// `srcNodeTags`; absent or `null` reads as empty.
    pub fn src_node_tags(&self) -> Vec<String> {
        self.fields
            .get("srcNodeTags")
            .and_then(Value::as_array)
            .map(|tags| {
                tags.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `srcNodeUserID` as an exact 64-bit integer.
    pub fn src_node_user_id(&self) -> Option<i64> {
        self.fields.get("srcNodeUserID").and_then(Value::as_i64)
    }

    /// A field of the PascalCase `kubernetes` object (`PodName`, `Namespace`, `Container`, ...).
    pub fn kubernetes(&self, key: &str) -> Option<&str> {
        self.fields.get("kubernetes")?.get(key)?.as_str()
    }
}

/// One event line: `[time, code, data]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EventLine<'a> {
    /// Seconds since the header's timestamp.
    pub time: f64,
    pub code: &'a str,
}

#[derive(Deserialize)]
struct RawEvent<'a>(f64, #[serde(borrow)] &'a str, IgnoredAny);

#[derive(Deserialize)]
struct RawEventEscapedCode(f64, String, IgnoredAny);

/// Parses an event line. `None` means the line is malformed; it is still stored byte-exact.
pub fn parse_event(line: &[u8]) -> Option<(f64, EventCode)> {
    let line = line.trim_ascii();
    if let Some((time, code)) = fast_event(line) {
        return (time.is_finite() && time >= 0.0).then_some((time, EventCode::from_code(code)));
    }
    let (time, code) = match serde_json::from_slice::<RawEvent<'_>>(line) {
        Ok(RawEvent(time, code, _)) => (time, EventCode::from_code(code)),
        // A code with escapes cannot be borrowed; rare enough to allocate.
        Err(_) => match serde_json::from_slice::<RawEventEscapedCode>(line) {
            Ok(RawEventEscapedCode(time, code, _)) => (time, EventCode::from_code(&code)),
            Err(_) => return None,
        },
    };
    (time.is_finite() && time >= 0.0).then_some((time, code))
}

/// The common shape of an event line, `[NUMBER,"CODE","DATA"]` with no whitespace, checked
/// without serde: the data string (almost all of the line) is skipped eight bytes at a time.
/// Returns `None` for anything else, and for anything it is not sure of (whitespace, escapes
/// in the code, surrogate escapes, non-UTF-8), which then goes through serde_json; it never
/// accepts a line serde_json would refuse.
fn fast_event(line: &[u8]) -> Option<(f64, &str)> {
    let rest = line.strip_prefix(b"[")?;
    let comma = rest.iter().position(|&b| b == b',')?;
    let number = &rest[..comma];
    if !json_number(number) {
        return None;
    }
    let time: f64 = std::str::from_utf8(number).ok()?.parse().ok()?;
    let rest = rest[comma + 1..].strip_prefix(b"\"")?;
    let end = rest.iter().position(|&b| b == b'"')?;
    let code = &rest[..end];
    if !code
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'\\')
    {
        return None;
    }
    let rest = rest[end + 1..].strip_prefix(b",\"")?;
    let (close, ascii) = json_string_end(rest)?;
    if &rest[close..] != b"\"]" {
        return None;
    }
    if !ascii {
        std::str::from_utf8(&rest[..close]).ok()?;
    }
    Some((time, std::str::from_utf8(code).ok()?))
}

/// Strict JSON number syntax: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
fn json_number(b: &[u8]) -> bool {
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    };
    let mut i = usize::from(b.first() == Some(&b'-'));
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return false;
        }
    }
    i == b.len()
}

/// The index of the quote that ends a JSON string body starting at `b[0]`, with every escape
/// valid and no raw control character; `None` when unsure (surrogate escapes) or invalid. The
/// flag is true only when every byte before the quote is ASCII: the string is then valid UTF-8
/// and its caller needs no second pass to check (most terminal output). (It can be false for
/// an ASCII string when a later byte shares the quote's eight-byte word.)
fn json_string_end(b: &[u8]) -> Option<(usize, bool)> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zero_bytes = |x: u64| x.wrapping_sub(ONES) & !x;
    // Every byte looked at, OR-ed together: a high bit means a byte above 0x7F.
    let mut seen = 0u64;
    let mut i = 0;
    loop {
        if let Some(word) = b.get(i..i + 8) {
            let w = u64::from_le_bytes([
                word[0], word[1], word[2], word[3], word[4], word[5], word[6], word[7],
            ]);
            seen |= w;
            // High bit set in each byte below 0x20, or equal to a quote or a backslash. Borrows
            // can mark bytes above a marked one, never below, so the lowest mark is exact.
            let marks = (w.wrapping_sub(ONES * 0x20) & !w
                | zero_bytes(w ^ (ONES * u64::from(b'"')))
                | zero_bytes(w ^ (ONES * u64::from(b'\\'))))
                & HIGHS;
            if marks == 0 {
                i += 8;
                continue;
            }
            i += (marks.trailing_zeros() / 8) as usize;
        }
        match *b.get(i)? {
            b'"' => return Some((i, seen & HIGHS == 0)),
            b'\\' => match *b.get(i + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                b'u' => {
                    let hex = b.get(i + 2..i + 6)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return None;
                    }
                    // Surrogates must pair up; leave them to serde_json.
                    if matches!(hex[0], b'd' | b'D') && !matches!(hex[1], b'0'..=b'7') {
                        return None;
                    }
                    i += 6;
                }
                _ => return None,
            },
            0..=0x1f => return None,
            other => {
                seen |= u64::from(other);
                i += 1;
            }
        }
    }
}

/// Event codes of asciicast v2; anything else is kept as `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventCode {
    Output,
    Input,
    Resize,
    Marker,
    Other,
}

impl EventCode {
    fn from_code(code: &str) -> Self {
        match code {
            "o" => Self::Output,
            "i" => Self::Input,
            "r" => Self::Resize,
            "m" => Self::Marker,
            _ => Self::Other,
        }
    }
}

/// Parses a Kubernetes resize payload, `"{height}x{width}"` (height first, unlike the asciicast
/// spec). Returns `(rows, columns)`.
pub fn parse_resize(data: &str) -> Option<(u16, u16)> {
    let (rows, cols) = data.trim().split_once('x')?;
    Some((rows.trim().parse().ok()?, cols.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast path agrees with serde_json on every line it decides, and decides the usual ones.
    #[test]
    fn fast_event_agrees_with_serde() {
        let slow = |line: &[u8]| -> Option<(f64, String)> {
            serde_json::from_slice::<RawEventEscapedCode>(line.trim_ascii())
                .ok()
                .map(|RawEventEscapedCode(t, c, _)| (t, c))
        };
        let mut lines: Vec<Vec<u8>> = [
            &br#"[0.5,"o","hello"]"#[..],
            br#"[1e-3,"o","\u001b[0mx\r\n"]"#,
            br#"[0,"r","80x24"]"#,
            br#"[-0,"o",""]"#,
            br#"[12.25E+2,"i","a\"b\\c\/"]"#,
            br#"[01,"o","x"]"#,
            br#"[1.,"o","x"]"#,
            br#"[.5,"o","x"]"#,
            br#"[+1,"o","x"]"#,
            br#"[NaN,"o","x"]"#,
            br#"[1,"o","\ud83d\ude00"]"#,
            br#"[1,"o","\ud83d"]"#,
            br#"[1,"o","\x"]"#,
            br#"[1,"o","\u12"]"#,
            b"[1,\"o\",\"tab\tinside\"]",
            br#"[1,"o","x"]x"#,
            br#"[1,"o","x",4]"#,
            br#"[1,"o",5]"#,
            br#"[1, "o", "spaced"]"#,
            br#"[1,"o\"","x"]"#,
            br#"[1,"o","x"#,
            "[2,\"o\",\"caf\u{e9} \u{2603} ok over eight bytes\"]".as_bytes(),
            b"[2,\"o\",\"bad \xff utf8 over eight bytes\"]",
            b"[2,\"o\",\"nul \x00\"]",
        ]
        .iter()
        .map(|l| l.to_vec())
        .collect();
        // Every single-byte change of a long valid line, too.
        let base = br#"[3.141592,"o","long output \u001b[1;32m with \\ escapes \" and text"]"#;
        for i in 0..base.len() {
            for b in [b'"', b'\\', b' ', b'x', b'0', 0x1f, 0xc3, b']', b','] {
                let mut l = base.to_vec();
                l[i] = b;
                lines.push(l);
            }
        }
        let mut decided = 0;
        for line in &lines {
            if let Some((t, c)) = fast_event(line) {
                decided += 1;
                assert_eq!(
                    slow(line),
                    Some((t, c.to_owned())),
                    "{}",
                    String::from_utf8_lossy(line)
                );
            }
        }
        assert!(fast_event(br#"[0.5,"o","hello"]"#).is_some());
        assert!(decided > 100, "fast path decided only {decided}");
    }

    #[test]
    fn header_tolerates_what_clients_send() {
        let line = br#"{"version":2,"width":0,"height":0,"timestamp":1679441819,"srcNode":"laptop.ts.net","srcNodeID":"n1","srcNodeTags":null,"srcNodeUserID":30585448562688899,"env":null,"sshUser":"","kubernetes":{"PodName":"web-0","Namespace":"prod","Container":"app","SessionType":"exec"},"futureKey":{"x":[1,2]}}"#;
        let h = CastHeader::parse(line).unwrap();
        assert_eq!(h.src_node_user_id(), Some(30_585_448_562_688_899));
        assert!(h.src_node_tags().is_empty());
        assert_eq!(h.str_field("connectionID"), None);
        assert_eq!(h.kubernetes("PodName"), Some("web-0"));
        assert_eq!(h.timestamp(), Some(1_679_441_819));
        assert!(h.fields().contains_key("futureKey"));
    }

    #[test]
    fn header_refusals_are_specific() {
        assert!(matches!(
            CastHeader::parse(b"[0,\"o\",\"x\"]"),
            Err(HeaderError::NotObject)
        ));
        assert!(matches!(
            CastHeader::parse(b"{\"version\":3}"),
            Err(HeaderError::WrongVersion { .. })
        ));
        assert!(matches!(
            CastHeader::parse(b"{\"width\":3}"),
            Err(HeaderError::WrongVersion { .. })
        ));
        assert!(matches!(
            CastHeader::parse(b"hello"),
            Err(HeaderError::NotJson { .. })
        ));
    }

    #[test]
    fn events_parse_exponents_and_refuse_garbage() {
        assert_eq!(
            parse_event(b"[5e-07, \"o\", \"x\"]\n"),
            Some((5e-7, EventCode::Output))
        );
        assert_eq!(
            parse_event(b"[1.6682777500000001,\"r\",\"24x80\"]"),
            Some((1.6682777500000001, EventCode::Resize))
        );
        assert_eq!(
            parse_event(b"[1,\"\\u006f\",\"x\"]"),
            Some((1.0, EventCode::Output))
        );
        assert_eq!(parse_event(b"[1,\"z\",{}]"), Some((1.0, EventCode::Other)));
        assert_eq!(parse_event(b"[1,\"o\"]"), None);
        assert_eq!(parse_event(b"[-1,\"o\",\"x\"]"), None);
        assert_eq!(parse_event(b"[1,\"o\",\"trunc"), None);
        assert_eq!(parse_resize("24x80"), Some((24, 80)));
        assert_eq!(parse_resize("24 x 80"), Some((24, 80)));
        assert_eq!(parse_resize("wide"), None);
    }
}
