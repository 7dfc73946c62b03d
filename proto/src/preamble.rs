//! The 64-byte plaintext preamble that opens every client connection, and the
//! 8-byte status reply a router or gateway may send instead of TLS.
//!
//! ```text
//! off len field
//!   0   4 magic "JVPN"
//!   4   1 layout version = 1
//!   5   1 kind: 1 HELLO, 2 RESUME
//!   6   1 routing key id
//!   7   1 flags = 0
//!   8  56 HELLO: ignored · RESUME: routing token (52) ‖ 4 zero bytes
//! ```

use crate::ReasonCode;
use crate::token::TOKEN_LEN;

pub const MAGIC: [u8; 4] = *b"JVPN";
pub const PREAMBLE_LEN: usize = 64;
pub const PREAMBLE_VERSION: u8 = 1;
pub const STATUS_LEN: usize = 8;

/// What the connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Hello = 1,
    Resume = 2,
}

/// A parsed preamble.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Preamble {
    /// A new session; the router places it.
    Hello { key_id: u8 },
    /// A reattach; the router opens `token` with routing key `key_id`.
    Resume { key_id: u8, token: [u8; TOKEN_LEN] },
}

/// Why a preamble was refused. Each maps to a pre-TLS status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PreambleError {
    /// The first four bytes were not `JVPN`.
    #[error("bad magic")]
    Magic,
    /// The layout version is not one we speak.
    #[error("unsupported preamble version {0}")]
    Version(u8),
    /// The kind byte is neither HELLO nor RESUME.
    #[error("unknown preamble kind {0}")]
    Kind(u8),
    /// Reserved flag bits were set.
    #[error("reserved flags set: {0:#04x}")]
    Flags(u8),
    /// A RESUME preamble's 4 trailing bytes were not zero.
    #[error("non-zero padding after the routing token")]
    Padding,
}

impl PreambleError {
    /// The pre-TLS status answering this error.
    pub fn status(self) -> Status {
        match self {
            PreambleError::Version(_) => Status::UnsupportedVersion,
            _ => Status::BadPreamble,
        }
    }
}

impl Preamble {
    pub fn kind(&self) -> Kind {
        match self {
            Preamble::Hello { .. } => Kind::Hello,
            Preamble::Resume { .. } => Kind::Resume,
        }
    }

    pub fn key_id(&self) -> u8 {
        match self {
            Preamble::Hello { key_id } | Preamble::Resume { key_id, .. } => *key_id,
        }
    }

    /// The first 8 bytes: the routing token's associated data.
    pub fn header(kind: Kind, key_id: u8) -> [u8; 8] {
        let [m0, m1, m2, m3] = MAGIC;
        [m0, m1, m2, m3, PREAMBLE_VERSION, kind as u8, key_id, 0]
    }

    pub fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let mut out = [0u8; PREAMBLE_LEN];
        out[..8].copy_from_slice(&Self::header(self.kind(), self.key_id()));
        if let Preamble::Resume { token, .. } = self {
            out[8..8 + TOKEN_LEN].copy_from_slice(token);
        }
        out
    }

    /// Parses exactly 64 bytes. Never panics.
    pub fn decode(buf: &[u8; PREAMBLE_LEN]) -> Result<Self, PreambleError> {
        if buf[..4] != MAGIC {
            return Err(PreambleError::Magic);
        }
        if buf[4] != PREAMBLE_VERSION {
            return Err(PreambleError::Version(buf[4]));
        }
        let key_id = buf[6];
        if buf[7] != 0 {
            return Err(PreambleError::Flags(buf[7]));
        }
        match buf[5] {
            1 => Ok(Preamble::Hello { key_id }),
            2 => {
                if buf[8 + TOKEN_LEN..] != [0u8; PREAMBLE_LEN - 8 - TOKEN_LEN] {
                    return Err(PreambleError::Padding);
                }
                let mut token = [0u8; TOKEN_LEN];
                token.copy_from_slice(&buf[8..8 + TOKEN_LEN]);
                Ok(Preamble::Resume { key_id, token })
            }
            k => Err(PreambleError::Kind(k)),
        }
    }
}

/// Pre-TLS status codes (DESIGN §2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    NoGateway = 1,
    Overloaded = 2,
    BadPreamble = 3,
    UnsupportedVersion = 4,
    /// Final: the owner is gone; re-handshake.
    OwnerLost = 5,
    /// Transient: retry the same session later.
    OwnerUnreachable = 6,
}

impl Status {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Status::NoGateway,
            2 => Status::Overloaded,
            3 => Status::BadPreamble,
            4 => Status::UnsupportedVersion,
            5 => Status::OwnerLost,
            6 => Status::OwnerUnreachable,
            _ => return None,
        })
    }

    pub fn reason(self) -> ReasonCode {
        match self {
            Status::NoGateway => ReasonCode::NoGateway,
            Status::Overloaded => ReasonCode::Overloaded,
            Status::BadPreamble => ReasonCode::BadPreamble,
            Status::UnsupportedVersion => ReasonCode::UnsupportedVersion,
            Status::OwnerLost => ReasonCode::OwnerLost,
            Status::OwnerUnreachable => ReasonCode::OwnerUnreachable,
        }
    }
}

/// The 8-byte reply `JVPN`,1,status,retry_after_ms(u16 BE). Unauthenticated:
/// agents cap `retry_after_ms` (see [`StatusReply::capped_retry_after_ms`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusReply {
    pub status: Status,
    pub retry_after_ms: u16,
}

/// Why 8 bytes were not a status reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StatusError {
    #[error("bad magic")]
    Magic,
    #[error("unsupported status version {0}")]
    Version(u8),
    #[error("unknown status {0}")]
    Status(u8),
}

impl StatusReply {
    pub fn encode(&self) -> [u8; STATUS_LEN] {
        let [m0, m1, m2, m3] = MAGIC;
        let [r0, r1] = self.retry_after_ms.to_be_bytes();
        [m0, m1, m2, m3, PREAMBLE_VERSION, self.status as u8, r0, r1]
    }

    pub fn decode(buf: &[u8; STATUS_LEN]) -> Result<Self, StatusError> {
        if buf[..4] != MAGIC {
            return Err(StatusError::Magic);
        }
        if buf[4] != PREAMBLE_VERSION {
            return Err(StatusError::Version(buf[4]));
        }
        let status = Status::from_u8(buf[5]).ok_or(StatusError::Status(buf[5]))?;
        Ok(Self {
            status,
            retry_after_ms: u16::from_be_bytes([buf[6], buf[7]]),
        })
    }

    /// min(value, 1 s, remaining transport TTL / 4): the hint is unauthenticated.
    pub fn capped_retry_after_ms(&self, remaining_ttl_ms: u64) -> u64 {
        u64::from(self.retry_after_ms)
            .min(1000)
            .min(remaining_ttl_ms / 4)
    }
}

/// True when the first byte a server sent is a status reply rather than TLS
/// (a TLS record starts with 0x16).
pub fn is_status_reply(first_byte: u8) -> bool {
    first_byte == MAGIC[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = Preamble::Hello { key_id: 4 };
        assert_eq!(Preamble::decode(&h.encode()), Ok(h));
        let r = Preamble::Resume {
            key_id: 9,
            token: [0xaa; TOKEN_LEN],
        };
        let bytes = r.encode();
        assert_eq!(&bytes[..8], b"JVPN\x01\x02\x09\x00");
        assert_eq!(&bytes[60..], &[0, 0, 0, 0]);
        assert_eq!(Preamble::decode(&bytes), Ok(r));
    }

    #[test]
    fn hello_ignores_trailing_bytes() {
        let mut b = Preamble::Hello { key_id: 1 }.encode();
        b[20] = 0xff;
        assert_eq!(Preamble::decode(&b), Ok(Preamble::Hello { key_id: 1 }));
    }

    #[test]
    fn each_bad_field_is_named() {
        let good = Preamble::Resume {
            key_id: 1,
            token: [1; TOKEN_LEN],
        }
        .encode();
        let mut b = good;
        b[0] = b'X';
        assert_eq!(Preamble::decode(&b), Err(PreambleError::Magic));
        let mut b = good;
        b[4] = 2;
        assert_eq!(Preamble::decode(&b), Err(PreambleError::Version(2)));
        assert_eq!(
            PreambleError::Version(2).status(),
            Status::UnsupportedVersion
        );
        let mut b = good;
        b[5] = 3;
        assert_eq!(Preamble::decode(&b), Err(PreambleError::Kind(3)));
        let mut b = good;
        b[7] = 1;
        assert_eq!(Preamble::decode(&b), Err(PreambleError::Flags(1)));
        let mut b = good;
        b[63] = 1;
        assert_eq!(Preamble::decode(&b), Err(PreambleError::Padding));
        assert_eq!(PreambleError::Padding.status(), Status::BadPreamble);
    }

    #[test]
    fn status_round_trip_and_cap() {
        for v in 1..=6u8 {
            let s = StatusReply {
                status: Status::from_u8(v).unwrap(),
                retry_after_ms: 65535,
            };
            let enc = s.encode();
            assert!(is_status_reply(enc[0]));
            assert_eq!(StatusReply::decode(&enc), Ok(s));
            assert_eq!(s.capped_retry_after_ms(60_000), 1000);
            assert_eq!(s.capped_retry_after_ms(2_000), 500);
        }
        assert!(!is_status_reply(0x16));
        assert_eq!(
            StatusReply::decode(b"JVPN\x01\x07\x00\x00"),
            Err(StatusError::Status(7))
        );
        assert_eq!(Status::OwnerLost.reason(), ReasonCode::OwnerLost);
    }
}
