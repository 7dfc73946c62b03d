//! What the data plane's streams say about themselves on the wire: the
//! destination an agent asks for (`CONNECT host:port`, RFC 9113 §8.5) and
//! why a gateway refused one. The agent maps a refusal to the SOCKS reply
//! code or HTTP status its application understands.

use std::fmt;
use std::net::IpAddr;

/// Where a stream should go: a name (resolved at the gateway, under its
/// policy) or an address, and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    Ip(IpAddr),
    /// A DNS name: 1..=253 bytes of letters, digits, `-`, `_` and `.`,
    /// labels of 1..=63 bytes, lowercased, without the root's trailing dot.
    Name(String),
}

/// Why a destination cannot be a [`Target`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("port 0")]
    PortZero,
    #[error("empty host")]
    EmptyHost,
    #[error("host name longer than 253 bytes")]
    NameTooLong,
    #[error("host name has a character outside letters, digits, '-', '_' and '.'")]
    BadNameChar,
    #[error("host name has an empty label or one longer than 63 bytes")]
    BadLabel,
    #[error("host name looks like a number (an IPv4 address in another spelling)")]
    NumericName,
    #[error("not host:port")]
    NotHostPort,
}

impl Target {
    /// A target from a host as an application gave it (a name or an IP
    /// literal) and a port.
    pub fn new(host: &str, port: u16) -> Result<Self, TargetError> {
        if port == 0 {
            return Err(TargetError::PortZero);
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Self {
                host: Host::Ip(canonical(ip)),
                port,
            });
        }
        let name = host.strip_suffix('.').unwrap_or(host);
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(Self {
                host: Host::Ip(canonical(ip)),
                port,
            });
        }
        if name.is_empty() {
            return Err(TargetError::EmptyHost);
        }
        if name.len() > 253 {
            return Err(TargetError::NameTooLong);
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(TargetError::BadNameChar);
        }
        if name.split('.').any(|l| l.is_empty() || l.len() > 63) {
            return Err(TargetError::BadLabel);
        }
        // `127.1`, `2130706433`: resolvers read these as IPv4 addresses; a
        // name is never all digits in its last label (RFC 3696 §2).
        if name
            .rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(TargetError::NumericName);
        }
        Ok(Self {
            host: Host::Name(name.to_ascii_lowercase()),
            port,
        })
    }

    /// Parses the authority form `host:port` (`[v6]:port` for IPv6), as
    /// in an HTTP `CONNECT` request line.
    pub fn parse_authority(s: &str) -> Result<Self, TargetError> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (v6, port) = rest.split_once("]:").ok_or(TargetError::NotHostPort)?;
            if v6.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(TargetError::NotHostPort);
            }
            (v6, port)
        } else {
            let (h, p) = s.rsplit_once(':').ok_or(TargetError::NotHostPort)?;
            if h.contains(':') {
                // A bare IPv6 literal must be bracketed.
                return Err(TargetError::NotHostPort);
            }
            (h, p)
        };
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(TargetError::NotHostPort);
        }
        let port: u16 = port.parse().map_err(|_| TargetError::NotHostPort)?;
        Self::new(host, port)
    }
}

/// IPv4-mapped IPv6 is the IPv4 address it maps: policy sees one form.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

impl fmt::Display for Target {
    /// The authority form, as a `CONNECT` request carries it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]:{}", self.port),
            Host::Ip(a) => write!(f, "{a}:{}", self.port),
            Host::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

/// Why a stream was not opened. The gateway answers a refused `CONNECT`
/// with [`Refusal::http_status`] and names the refusal in the
/// [`REFUSAL_HEADER`] header; the agent reads it back with
/// [`Refusal::from_response`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The session's policy does not allow this destination.
    NotAllowed,
    /// The name did not resolve.
    NameNotResolved,
    NetworkUnreachable,
    HostUnreachable,
    ConnectionRefused,
    /// The destination did not answer within the connect timeout.
    TimedOut,
    /// The session has as many open streams as its policy allows.
    TooManyStreams,
    /// A malformed destination.
    BadTarget,
    /// Anything else (also: a refusal this version does not know).
    Failed,
}

/// Response header naming a refusal exactly (the status alone is coarse).
pub const REFUSAL_HEADER: &str = "jvpn-refusal";

impl Refusal {
    pub const ALL: [Refusal; 9] = [
        Refusal::NotAllowed,
        Refusal::NameNotResolved,
        Refusal::NetworkUnreachable,
        Refusal::HostUnreachable,
        Refusal::ConnectionRefused,
        Refusal::TimedOut,
        Refusal::TooManyStreams,
        Refusal::BadTarget,
        Refusal::Failed,
    ];

    /// The metric label and header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotAllowed => "not_allowed",
            Refusal::NameNotResolved => "name_not_resolved",
            Refusal::NetworkUnreachable => "network_unreachable",
            Refusal::HostUnreachable => "host_unreachable",
            Refusal::ConnectionRefused => "connection_refused",
            Refusal::TimedOut => "timed_out",
            Refusal::TooManyStreams => "too_many_streams",
            Refusal::BadTarget => "bad_target",
            Refusal::Failed => "failed",
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            Refusal::NotAllowed => 403,
            Refusal::BadTarget => 400,
            Refusal::TooManyStreams => 503,
            Refusal::TimedOut => 504,
            Refusal::NameNotResolved
            | Refusal::NetworkUnreachable
            | Refusal::HostUnreachable
            | Refusal::ConnectionRefused
            | Refusal::Failed => 502,
        }
    }

    /// What a response with `status` and the refusal header's `name` (if
    /// any) means; an unknown name falls back to the status.
    pub fn from_response(status: u16, name: Option<&str>) -> Self {
        if let Some(r) = name.and_then(|n| Self::ALL.into_iter().find(|r| r.as_str() == n)) {
            return r;
        }
        match status {
            403 => Refusal::NotAllowed,
            400 => Refusal::BadTarget,
            503 => Refusal::TooManyStreams,
            504 => Refusal::TimedOut,
            _ => Refusal::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_checked_and_canonical() {
        let t = Target::new("Example.COM.", 443).unwrap();
        assert_eq!(t.host, Host::Name("example.com".into()));
        assert_eq!(t.to_string(), "example.com:443");
        assert_eq!(Target::new("x", 0), Err(TargetError::PortZero));
        assert_eq!(Target::new("", 1), Err(TargetError::EmptyHost));
        assert_eq!(Target::new(".", 1), Err(TargetError::EmptyHost));
        assert_eq!(Target::new("a b", 1), Err(TargetError::BadNameChar));
        // Found by the fuzzer: extra dots made a name that printed
        // differently from how it parsed.
        assert_eq!(Target::new("ple.a-ple..", 1), Err(TargetError::BadLabel));
        assert_eq!(Target::new("a..b", 1), Err(TargetError::BadLabel));
        assert_eq!(Target::new(".a", 1), Err(TargetError::BadLabel));
        assert_eq!(Target::new(&"a".repeat(64), 1), Err(TargetError::BadLabel));
        // Found by review: an IP literal with the root's dot is that IP.
        let dotted = Target::new("127.0.0.1.", 80).unwrap();
        assert_eq!(dotted.host, Host::Ip("127.0.0.1".parse().unwrap()));
        assert_eq!(Target::new("127.1", 80), Err(TargetError::NumericName));
        assert_eq!(Target::new("2130706433", 80), Err(TargetError::NumericName));
        assert_eq!(Target::new("0x7f.1", 80), Err(TargetError::NumericName));
        assert_eq!(Target::new("a/b", 1), Err(TargetError::BadNameChar));
        assert_eq!(Target::new("é.fr", 1), Err(TargetError::BadNameChar));
        assert_eq!(
            Target::new(&"a".repeat(254), 1),
            Err(TargetError::NameTooLong)
        );
        // Mapped IPv4 is IPv4: a policy on 127.0.0.0/8 sees it.
        let m = Target::new("::ffff:127.0.0.1", 80).unwrap();
        assert_eq!(m.host, Host::Ip("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn authorities_parse_like_a_connect_request_line() {
        let v6 = Target::parse_authority("[2001:db8::1]:8443").unwrap();
        assert_eq!(v6.to_string(), "[2001:db8::1]:8443");
        assert_eq!(
            Target::parse_authority("10.0.0.1:22").unwrap().to_string(),
            "10.0.0.1:22"
        );
        for bad in [
            "example.com",
            "example.com:",
            "example.com:+80",
            "example.com:65536",
            "2001:db8::1:80",
            "[2001:db8::1]",
            "[nonsense]:80",
            ":80",
        ] {
            assert!(Target::parse_authority(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refusals_round_trip_through_a_response() {
        for r in Refusal::ALL {
            assert_eq!(Refusal::from_response(r.http_status(), Some(r.as_str())), r);
        }
        // An older or newer gateway: the status alone still means something.
        assert_eq!(Refusal::from_response(403, None), Refusal::NotAllowed);
        assert_eq!(
            Refusal::from_response(504, Some("new_reason")),
            Refusal::TimedOut
        );
        assert_eq!(Refusal::from_response(500, None), Refusal::Failed);
    }
}
