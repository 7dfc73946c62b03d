//! SOCKS5 (RFC 1928), sans-IO: the greeting and the `CONNECT` request an
//! application sends, and the replies. Only "no authentication" is offered
//! (front doors listen on loopback unless an operator says otherwise) and
//! only `CONNECT`; names are passed on unresolved, to be resolved at the
//! gateway under its policy.

use std::net::{Ipv4Addr, Ipv6Addr};

use jvpn_proto::stream::{Refusal, Target, TargetError};

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0x00;
const NO_ACCEPTABLE: u8 = 0xff;
const CMD_CONNECT: u8 = 1;

/// A request the front door cannot serve; the connection is answered (when
/// the protocol has an answer for it) and closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SocksError {
    #[error("not SOCKS version 5 (got {0})")]
    Version(u8),
    #[error("the client offers no method without authentication")]
    NoAcceptableMethod,
    #[error("command {0} is not supported (only CONNECT)")]
    Command(u8),
    #[error("address type {0} is not supported")]
    AddressType(u8),
    #[error("reserved byte is {0}, not 0")]
    Reserved(u8),
    #[error("bad destination: {0}")]
    Target(#[from] TargetError),
}

impl SocksError {
    /// The reply that tells the client why, if one exists at this stage.
    pub fn reply(self) -> Option<Vec<u8>> {
        match self {
            SocksError::NoAcceptableMethod => Some(vec![VERSION, NO_ACCEPTABLE]),
            SocksError::Command(_) => Some(reply(REP_COMMAND)),
            SocksError::AddressType(_) => Some(reply(REP_ADDRESS_TYPE)),
            SocksError::Target(_) | SocksError::Reserved(_) => Some(reply(REP_FAILURE)),
            SocksError::Version(_) => None,
        }
    }
}

/// The greeting: `VER NMETHODS METHODS…`. `Ok(None)`: need more bytes;
/// `Ok(Some(n))`: `n` bytes used, answer with [`METHOD_REPLY`].
pub fn parse_greeting(buf: &[u8]) -> Result<Option<usize>, SocksError> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(SocksError::Version(ver));
    }
    let Some(&n) = buf.get(1) else {
        return Ok(None);
    };
    let Some(methods) = buf.get(2..2 + usize::from(n)) else {
        return Ok(None);
    };
    if !methods.contains(&NO_AUTH) {
        return Err(SocksError::NoAcceptableMethod);
    }
    Ok(Some(2 + usize::from(n)))
}

/// "Version 5, no authentication".
pub const METHOD_REPLY: [u8; 2] = [VERSION, NO_AUTH];

/// The request: `VER CMD RSV ATYP DST.ADDR DST.PORT`. `Ok(None)`: need more.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Target, usize)>, SocksError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let [ver, cmd, rsv, atyp] = [head[0], head[1], head[2], head[3]];
    if ver != VERSION {
        return Err(SocksError::Version(ver));
    }
    if cmd != CMD_CONNECT {
        return Err(SocksError::Command(cmd));
    }
    if rsv != 0 {
        return Err(SocksError::Reserved(rsv));
    }
    let (host, at) = match atyp {
        1 => {
            let Some(a) = buf.get(4..8) else {
                return Ok(None);
            };
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            (ip.to_string(), 8)
        }
        3 => {
            let Some(&len) = buf.get(4) else {
                return Ok(None);
            };
            let Some(name) = buf.get(5..5 + usize::from(len)) else {
                return Ok(None);
            };
            // Non-ASCII bytes fail the name check below.
            (
                String::from_utf8_lossy(name).into_owned(),
                5 + usize::from(len),
            )
        }
        4 => {
            let Some(a) = buf.get(4..20) else {
                return Ok(None);
            };
            let mut o = [0u8; 16];
            o.copy_from_slice(a);
            (Ipv6Addr::from(o).to_string(), 20)
        }
        other => return Err(SocksError::AddressType(other)),
    };
    let Some(p) = buf.get(at..at + 2) else {
        return Ok(None);
    };
    let port = u16::from_be_bytes([p[0], p[1]]);
    Ok(Some((Target::new(&host, port)?, at + 2)))
}

const REP_SUCCESS: u8 = 0;
const REP_FAILURE: u8 = 1;
const REP_COMMAND: u8 = 7;
const REP_ADDRESS_TYPE: u8 = 8;

/// The reply code that tells a SOCKS client why its stream was refused.
pub fn refusal_code(r: Refusal) -> u8 {
    match r {
        Refusal::NotAllowed => 2,
        Refusal::NetworkUnreachable => 3,
        Refusal::HostUnreachable | Refusal::NameNotResolved => 4,
        Refusal::ConnectionRefused => 5,
        Refusal::TimedOut => 6,
        Refusal::TooManyStreams | Refusal::BadTarget | Refusal::Failed => REP_FAILURE,
    }
}

/// A reply with `code` and an unspecified bound address (the real one is
/// the gateway's, of no use to the client, and not ours to reveal).
pub fn reply(code: u8) -> Vec<u8> {
    vec![VERSION, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// "Succeeded": the stream is open, bytes follow.
pub fn success() -> Vec<u8> {
    reply(REP_SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_greeting_needs_no_auth_offered() {
        assert_eq!(parse_greeting(&[5]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 2]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 2, 0, 9]), Ok(Some(4)));
        assert_eq!(
            parse_greeting(&[5, 1, 2]),
            Err(SocksError::NoAcceptableMethod)
        );
        assert_eq!(SocksError::NoAcceptableMethod.reply(), Some(vec![5, 0xff]));
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(SocksError::Version(4)));
    }

    #[test]
    fn connect_requests_of_every_address_type() {
        let name = [&[5, 1, 0, 3, 11][..], b"example.org", &[1, 187]].concat();
        let (t, n) = parse_request(&name).unwrap().unwrap();
        assert_eq!((t.to_string(), n), ("example.org:443".into(), name.len()));
        for cut in 0..name.len() {
            assert_eq!(parse_request(&name[..cut]), Ok(None), "cut at {cut}");
        }
        let v4 = [5, 1, 0, 1, 10, 0, 0, 7, 0, 22];
        assert_eq!(
            parse_request(&v4).unwrap().unwrap().0.to_string(),
            "10.0.0.7:22"
        );
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&"2001:db8::5".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0x1f, 0x90]);
        assert_eq!(
            parse_request(&v6).unwrap().unwrap().0.to_string(),
            "[2001:db8::5]:8080"
        );
    }

    #[test]
    fn what_is_not_served_is_refused_with_the_right_code() {
        let bind = [5, 2, 0, 1, 1, 2, 3, 4, 0, 80];
        assert_eq!(parse_request(&bind), Err(SocksError::Command(2)));
        assert_eq!(SocksError::Command(2).reply().unwrap()[1], 7);
        assert_eq!(
            parse_request(&[5, 1, 0, 9, 0]),
            Err(SocksError::AddressType(9))
        );
        let port0 = [5, 1, 0, 1, 1, 2, 3, 4, 0, 0];
        assert_eq!(
            parse_request(&port0),
            Err(SocksError::Target(TargetError::PortZero))
        );
        let spaced = [&[5, 1, 0, 3, 3][..], b"a b", &[0, 80]].concat();
        assert!(matches!(
            parse_request(&spaced),
            Err(SocksError::Target(TargetError::BadNameChar))
        ));
        let utf8 = [&[5, 1, 0, 3, 2][..], "é".as_bytes(), &[0, 80]].concat();
        assert!(parse_request(&utf8).is_err());
        assert_eq!(refusal_code(Refusal::NotAllowed), 2);
        assert_eq!(refusal_code(Refusal::ConnectionRefused), 5);
    }
}
