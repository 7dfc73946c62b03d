//! Identifiers that cross component boundaries.
//!
//! Hashing rule: wherever an id feeds placement or a keyed hash, it contributes
//! explicit bytes ([`SessionId::as_bytes`], [`NodeId::encode_into`]), never a
//! derived `Hash` of integers or slices (whose byte layout is not a contract).

use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::sync::Arc;

/// Errors parsing an identifier from text or bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The input had the wrong number of bytes (or hex digits).
    #[error("expected {expected} bytes, got {got}")]
    Length { expected: usize, got: usize },
    /// The input was not valid hexadecimal.
    #[error("not hexadecimal")]
    Hex,
    /// A node id was empty, too long, or used a character outside `[A-Za-z0-9._-]`.
    #[error("node id must be 1..=63 characters of [A-Za-z0-9._-], got {0:?}")]
    NodeId(String),
}

/// A session id: 16 random bytes minted by the owning gateway. Shown as 32 hex digits.
///
/// Never put one in a metric label or an info-level log line.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SessionId([u8; 16]);

impl SessionId {
    pub const LEN: usize = 16;

    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    pub fn from_slice(bytes: &[u8]) -> Result<Self, IdError> {
        let arr: [u8; 16] = bytes.try_into().map_err(|_| IdError::Length {
            expected: Self::LEN,
            got: bytes.len(),
        })?;
        Ok(Self(arr))
    }

    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl Hash for SessionId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Explicit bytes only: this is what the ring hashes.
        state.write(&self.0);
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

impl FromStr for SessionId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 2 * Self::LEN {
            return Err(IdError::Length {
                expected: Self::LEN,
                got: s.len() / 2,
            });
        }
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out).map_err(|_| IdError::Hex)?;
        Ok(Self(out))
    }
}

/// A gateway's configured name (`g1`, `edge-fra-3`): 1..=63 bytes of `[A-Za-z0-9._-]`.
///
/// Cheap to clone. Its canonical encoding in hashes is `len(u8) ‖ bytes`, so
/// concatenations with other fields are unambiguous.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(Arc<str>);

impl NodeId {
    pub const MAX_LEN: usize = 63;

    pub fn new(name: &str) -> Result<Self, IdError> {
        let ok = !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(Arc::from(name)))
        } else {
            Err(IdError::NodeId(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Appends `len(u8) ‖ bytes`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.0.len() as u8);
        out.extend_from_slice(self.0.as_bytes());
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.0)
    }
}

impl FromStr for NodeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A random u64 drawn at every gateway process start; distinguishes two lives
/// of one node id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Incarnation(pub u64);

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

macro_rules! short_hex_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub [u8; 8]);

        impl $name {
            pub fn from_slice(bytes: &[u8]) -> Result<Self, IdError> {
                let arr: [u8; 8] = bytes
                    .try_into()
                    .map_err(|_| IdError::Length { expected: 8, got: bytes.len() })?;
                Ok(Self(arr))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut out = [0u8; 8];
                if s.len() != 16 {
                    return Err(IdError::Length { expected: 8, got: s.len() / 2 });
                }
                hex::decode_to_slice(s, &mut out).map_err(|_| IdError::Hex)?;
                Ok(Self(out))
            }
        }
    };
}

short_hex_id!(
    /// 8-byte keyed hash of a view's canonical encoding (members and ring parameters).
    ViewId
);
short_hex_id!(
    /// 8-byte keyed hash of `node_id ‖ incarnation`: names an owner inside routing tokens.
    OwnerTag
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_id_hex_round_trip() {
        let id = SessionId::from_bytes([0x0f; 16]);
        let s = id.to_string();
        assert_eq!(s, "0f".repeat(16));
        assert_eq!(s.parse::<SessionId>(), Ok(id));
        assert_eq!("zz".repeat(16).parse::<SessionId>(), Err(IdError::Hex));
        assert!(matches!(
            "00".parse::<SessionId>(),
            Err(IdError::Length { .. })
        ));
        assert!(SessionId::from_slice(&[1; 15]).is_err());
    }

    #[test]
    fn node_id_validation() {
        assert!(NodeId::new("g1").is_ok());
        assert!(NodeId::new("edge-fra_3.a").is_ok());
        assert!(NodeId::new("").is_err());
        assert!(NodeId::new("a b").is_err());
        assert!(NodeId::new(&"x".repeat(64)).is_err());
        assert!(NodeId::new(&"x".repeat(63)).is_ok());
        let mut enc = Vec::new();
        NodeId::new("g1").unwrap().encode_into(&mut enc);
        assert_eq!(enc, b"\x02g1");
    }

    #[test]
    fn short_ids_round_trip() {
        let v = ViewId([1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(v.to_string().parse::<ViewId>(), Ok(v));
        assert!(OwnerTag::from_slice(&[0; 7]).is_err());
    }
}
