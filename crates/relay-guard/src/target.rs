//! Which request targets the edge relays: paths that mean exactly what they say.
//!
//! Routes match the raw path and the agent forwards it unchanged, so a path that a server
//! behind the agent would read differently (nginx, Kestrel and most frameworks resolve
//! `/a/../b`, decode `%2e%2e` and `%2f`, and some treat `\` as `/`) could match one route at the
//! edge and reach another handler at the bot, skipping that handler's checks. The edge therefore
//! refuses, before any route is matched, every path that normalisation could change in meaning:
//! `.` and `..` segments (raw or percent-encoded, in any case), an encoded `/` or `\`, a
//! backslash, NUL or any other control byte, a malformed or non-UTF-8 percent escape. ACS never
//! sends such paths. What passes is forwarded byte for byte, so the bot receives exactly the
//! path that was matched.

/// Why a path was refused; the fixed reason class for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRefusal {
    /// The path does not start with `/` (an asterisk or authority form).
    NotAbsolute,
    /// A raw control byte (below 0x20, or 0x7f) or a backslash.
    ForbiddenByte,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// A percent-encoded `/`, `\`, or control byte.
    EncodedSeparator,
    /// A segment that is `.` or `..` once decoded.
    DotSegment,
    /// A segment whose percent escapes do not decode to UTF-8 (overlong forms such as `%c0%ae`).
    InvalidUtf8,
    /// An escaped escape of a dot or separator (`%252e`, `%252f`, `%255c`), which a server that
    /// decodes twice reads as one.
    DoubleEncoded,
}

impl PathRefusal {
    /// The reason label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NotAbsolute => "not-absolute",
            Self::ForbiddenByte => "forbidden-byte",
            Self::BadEscape => "bad-escape",
            Self::EncodedSeparator => "encoded-separator",
            Self::DotSegment => "dot-segment",
            Self::InvalidUtf8 => "invalid-utf8",
            Self::DoubleEncoded => "double-encoded",
        }
    }
}

fn hex(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

fn forbidden(byte: u8) -> bool {
    byte < 0x20 || byte == 0x7f || byte == b'\\'
}

/// Checks one segment (between slashes): decodes its escapes and refuses what could change
/// meaning downstream.
fn check_segment(segment: &[u8]) -> Result<(), PathRefusal> {
    let mut decoded = Vec::with_capacity(segment.len());
    let mut bytes = segment.iter().copied();
    while let Some(byte) = bytes.next() {
        if forbidden(byte) {
            return Err(PathRefusal::ForbiddenByte);
        }
        if byte != b'%' {
            decoded.push(byte);
            continue;
        }
        let (Some(high), Some(low)) = (bytes.next().and_then(hex), bytes.next().and_then(hex)) else {
            return Err(PathRefusal::BadEscape);
        };
        let value = (high << 4) | low;
        if value == b'/' || forbidden(value) {
            return Err(PathRefusal::EncodedSeparator);
        }
        decoded.push(value);
    }
    // Servlet containers drop `;parameters` from a segment before resolving dots: `..;x` is `..`.
    let name = decoded.split(|b| *b == b';').next().unwrap_or_default();
    if name == b"." || name == b".." {
        return Err(PathRefusal::DotSegment);
    }
    let lower = decoded.to_ascii_lowercase();
    if [b"%2e", b"%2f", b"%5c"].iter().any(|escape| lower.windows(3).any(|w| w == *escape)) {
        return Err(PathRefusal::DoubleEncoded);
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err(PathRefusal::InvalidUtf8);
    }
    Ok(())
}

/// Accepts `path` (the request target without its query) only if every server behind the agent
/// would read it as the edge does.
pub fn check_path(path: &str) -> Result<(), PathRefusal> {
    let Some(rest) = path.strip_prefix('/') else { return Err(PathRefusal::NotAbsolute) };
    rest.as_bytes().split(|b| *b == b'/').try_for_each(check_segment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acs_paths_and_ordinary_escapes_pass() {
        for path in [
            "/",
            "/api/incomingCall",
            "/api/callbacks/4f1c1a52-0000-4000-8000-000000000001/x",
            "/ws",
            "/api/callbacks/a%20b",
            "/api/callbacks/caf%C3%A9",
            "/api/callbacks/a.b/..c/c../.d",
            "/api/callbacks//double",
        ] {
            assert_eq!(check_path(path), Ok(()), "{path}");
        }
    }

    #[test]
    fn dot_segments_are_refused_raw_or_encoded_in_any_case() {
        for path in [
            "/api/callbacks/../incomingCall",
            "/api/callbacks/./x",
            "/api/callbacks/..",
            "/api/callbacks/%2e%2e/incomingCall",
            "/api/callbacks/%2E%2E/incomingCall",
            "/api/callbacks/.%2e/x",
            "/api/callbacks/%2e./x",
            "/api/callbacks/%2e/x",
            "/..",
        ] {
            assert_eq!(check_path(path), Err(PathRefusal::DotSegment), "{path}");
        }
    }

    #[test]
    fn separators_smuggled_in_escapes_or_backslashes_are_refused() {
        assert_eq!(check_path("/api/callbacks/..%2fincomingCall"), Err(PathRefusal::EncodedSeparator));
        assert_eq!(check_path("/api/callbacks/..%2FincomingCall"), Err(PathRefusal::EncodedSeparator));
        assert_eq!(check_path("/api/callbacks/..%5cincomingCall"), Err(PathRefusal::EncodedSeparator));
        assert_eq!(check_path("/api/callbacks/x%00"), Err(PathRefusal::EncodedSeparator));
        assert_eq!(check_path("/api/callbacks/x%7f"), Err(PathRefusal::EncodedSeparator));
        assert_eq!(check_path("/api/callbacks/..\\incomingCall"), Err(PathRefusal::ForbiddenByte));
        assert_eq!(check_path("/api/callbacks/a\tb"), Err(PathRefusal::ForbiddenByte));
        assert_eq!(check_path("/api/callbacks/a%2"), Err(PathRefusal::BadEscape));
        assert_eq!(check_path("/api/callbacks/a%zz"), Err(PathRefusal::BadEscape));
        assert_eq!(check_path("/api/callbacks/%c0%ae%c0%ae/x"), Err(PathRefusal::InvalidUtf8));
        assert_eq!(check_path("*"), Err(PathRefusal::NotAbsolute));
    }

    #[test]
    fn path_parameters_and_double_encoding_cannot_hide_a_dot_segment() {
        assert_eq!(check_path("/api/callbacks/..;/incomingCall"), Err(PathRefusal::DotSegment));
        assert_eq!(check_path("/api/callbacks/..;jsessionid=1/x"), Err(PathRefusal::DotSegment));
        assert_eq!(check_path("/api/callbacks/%252e%252e/incomingCall"), Err(PathRefusal::DoubleEncoded));
        assert_eq!(check_path("/api/callbacks/..%252Fx"), Err(PathRefusal::DoubleEncoded));
        assert_eq!(check_path("/api/callbacks/a;b=c"), Ok(()));
        assert_eq!(check_path("/api/callbacks/100%25"), Ok(()));
    }
}
