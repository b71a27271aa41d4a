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
