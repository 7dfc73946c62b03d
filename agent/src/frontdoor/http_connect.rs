//! HTTP `CONNECT` (RFC 9110 §9.3.6) on a front door, sans-IO: the request
//! head an application sends to open a tunnel, and the answers. Parsing is
//! `httparse`'s; what is accepted beyond it is strict: method `CONNECT`,
//! an authority-form target, a head of at most [`MAX_HEAD`] bytes.

use jvpn_proto::stream::{Refusal, Target, TargetError};

/// Largest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
const MAX_HEADERS: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("request head over {MAX_HEAD} bytes or {MAX_HEADERS} headers")]
    TooLarge,
    #[error("method {0} is not CONNECT")]
    Method(String),
    #[error("bad target: {0}")]
    Target(#[from] TargetError),
}

impl ConnectError {
    /// The response that tells the client why; a target or method the
    /// front door refuses carries the reason the gateway would give
    /// (`bad_target`), so clients read one header for both.
    pub fn response(&self) -> Vec<u8> {
        let bad = Some(Refusal::BadTarget);
        match self {
            ConnectError::Method(_) => response(405, "Method Not Allowed", bad),
            ConnectError::TooLarge => response(431, "Request Header Fields Too Large", None),
            ConnectError::Malformed(_) | ConnectError::Target(_) => {
                response(400, "Bad Request", bad)
            }
        }
    }
}

/// `Ok(None)`: the head is not complete yet; `Ok(Some((target, n)))`: the
/// head took `n` bytes and whatever follows is the tunnel's first data.
pub fn parse(buf: &[u8]) -> Result<Option<(Target, usize)>, ConnectError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > MAX_HEAD {
                Err(ConnectError::TooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(ConnectError::TooLarge),
        Err(e) => return Err(ConnectError::Malformed(e.to_string())),
    };
    if n > MAX_HEAD {
        return Err(ConnectError::TooLarge);
    }
    let method = req.method.unwrap_or_default();
    if method != "CONNECT" {
        return Err(ConnectError::Method(method.chars().take(16).collect()));
    }
    let target = Target::parse_authority(req.path.unwrap_or_default())?;
    Ok(Some((target, n)))
}

fn response(status: u16, reason: &str, refusal: Option<Refusal>) -> Vec<u8> {
    let header = refusal.map_or_else(String::new, |r| {
        format!("{}: {}\r\n", jvpn_proto::stream::REFUSAL_HEADER, r.as_str())
    });
    format!("HTTP/1.1 {status} {reason}\r\n{header}Content-Length: 0\r\nConnection: close\r\n\r\n")
        .into_bytes()
}

/// The tunnel is open; bytes follow.
pub fn established() -> Vec<u8> {
    b"HTTP/1.1 200 Connection Established\r\n\r\n".to_vec()
}

/// The gateway refused the stream: the same status it answered, and its
/// reason in the header the gateway uses.
pub fn refused(r: Refusal) -> Vec<u8> {
    let status = r.http_status();
    let reason = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Bad Gateway",
    };
    response(status, reason, Some(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_head_gives_its_target_and_length() {
        let head = b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n";
        let mut buf = head.to_vec();
        buf.extend_from_slice(b"\x16\x03\x01early tls bytes");
        let (t, n) = parse(&buf).unwrap().unwrap();
        assert_eq!((t.to_string(), n), ("example.org:443".into(), head.len()));
        for cut in 0..head.len() {
            assert_eq!(parse(&head[..cut]), Ok(None), "cut at {cut}");
        }
        let v6 = b"CONNECT [::1]:22 HTTP/1.1\r\n\r\n";
        assert_eq!(parse(v6).unwrap().unwrap().0.to_string(), "[::1]:22");
    }

    #[test]
    fn anything_else_is_answered_and_refused() {
        let get = b"GET http://example.org/ HTTP/1.1\r\n\r\n";
        let e = parse(get).unwrap_err();
        assert_eq!(e, ConnectError::Method("GET".into()));
        let said = String::from_utf8(e.response()).unwrap();
        assert!(said.starts_with("HTTP/1.1 405 "), "{said}");
        assert!(said.contains("\r\njvpn-refusal: bad_target\r\n"), "{said}");
        let origin_form = b"CONNECT / HTTP/1.1\r\n\r\n";
        let e = parse(origin_form).unwrap_err();
        assert!(matches!(e, ConnectError::Target(_)));
        let said = String::from_utf8(e.response()).unwrap();
        assert!(said.starts_with("HTTP/1.1 400 "), "{said}");
        assert!(said.contains("\r\njvpn-refusal: bad_target\r\n"), "{said}");
        let port_zero = parse(b"CONNECT example.com:0 HTTP/1.1\r\n\r\n").unwrap_err();
        assert!(
            String::from_utf8(port_zero.response())
                .unwrap()
                .contains("jvpn-refusal: bad_target")
        );
        assert!(matches!(
            parse(b"CONNECT\x00 x HTTP/1.1\r\n\r\n"),
            Err(ConnectError::Malformed(_))
        ));
        // A head that never ends is cut off at the limit.
        let mut endless = b"CONNECT a:1 HTTP/1.1\r\n".to_vec();
        while endless.len() <= MAX_HEAD {
            endless.extend_from_slice(b"X-Pad: yyyyyyyyyyyyyyyyyyyyyyyyyy\r\n");
        }
        assert!(matches!(
            parse(&endless),
            Err(ConnectError::TooLarge | ConnectError::Malformed(_))
        ));
    }

    #[test]
    fn refusals_carry_status_and_reason() {
        let r = String::from_utf8(refused(Refusal::NotAllowed)).unwrap();
        assert!(r.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{r}");
        assert!(r.contains("jvpn-refusal: not_allowed\r\n"));
        assert!(established().starts_with(b"HTTP/1.1 200 "));
    }
}
