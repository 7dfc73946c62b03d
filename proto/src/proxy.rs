//! PROXY protocol v2 as the router writes it and the gateway reads it.
//!
//! Parsing and building are delegated to the `ppp` crate; this module adds the
//! size limit, the three router TLVs and typed errors:
//!
//! | TLV  | value |
//! |------|-------|
//! | 0xE0 | router id (UTF-8) |
//! | 0xE1 | view id (8 bytes) the router placed under |
//! | 0xE2 | intended owner for a RESUME: `node_id ‖ incarnation(u64 BE)` |
//! | 0xE3 | takeover (topology 3): one byte `1`; the RESUME's owner is dead |
//! |      | and the intended owner is the session's shard owner, asked to claim |

use std::net::SocketAddr;

use ppp::v2::{self, Addresses, Builder, Command, Protocol, Version};

use crate::{Incarnation, NodeId, ViewId};

pub const TLV_ROUTER_ID: u8 = 0xE0;
pub const TLV_VIEW_ID: u8 = 0xE1;
pub const TLV_INTENDED_OWNER: u8 = 0xE2;
/// Added with topology 3's takeover; a gateway one version older ignores
/// it (and answers `unknown_session`, so the agent re-handshakes).
pub const TLV_TAKEOVER: u8 = 0xE3;
/// Largest header a gateway accepts.
pub const MAX_HEADER_LEN: usize = 512;
/// The 12-byte v2 signature.
pub const SIGNATURE: &[u8] = v2::PROTOCOL_PREFIX;
const FIXED_LEN: usize = 16;

/// A parsed or to-be-written PROXY v2 header.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ProxyHeader {
    /// `None` for a `LOCAL` command (health check: no session follows; a
    /// LOCAL header carries no TLVs either).
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    pub router_id: Option<String>,
    pub view_id: Option<ViewId>,
    pub intended_owner: Option<(NodeId, Incarnation)>,
    /// The router found the RESUME's owner dead and sent it to the
    /// session's shard owner to claim it from the shared store.
    pub takeover: bool,
}

/// Why bytes were not an acceptable PROXY v2 header.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The bytes do not start with the v2 signature.
    #[error("missing PROXY v2 signature")]
    Signature,
    /// The declared length exceeds [`MAX_HEADER_LEN`].
    #[error("PROXY header of {0} bytes exceeds the {MAX_HEADER_LEN}-byte limit")]
    TooLong(usize),
    /// `ppp` rejected the header.
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    /// A PROXY command carried no IP addresses (UNIX or unspecified family).
    #[error("PROXY command without an IPv4/IPv6 address block")]
    NotInet,
    /// One of our TLVs had a bad value.
    #[error("bad value in TLV {0:#04x}")]
    BadTlv(u8),
}

/// Outcome of feeding bytes to [`ProxyHeader::decode`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// At least this many bytes in total are needed.
    NeedMore(usize),
    /// A complete header, and how many bytes it used.
    Done(ProxyHeader, usize),
}

impl ProxyHeader {
    /// A `LOCAL` (health-check) header.
    pub fn local() -> Self {
        Self::default()
    }

    pub fn is_local(&self) -> bool {
        self.addresses.is_none()
    }

    pub fn source(&self) -> Option<SocketAddr> {
        self.addresses.map(|(s, _)| s)
    }

    pub fn encode(&self) -> Result<Vec<u8>, ProxyError> {
        let err = |e: std::io::Error| ProxyError::Malformed(e.to_string());
        let mut b = match self.addresses {
            Some(pair) => Builder::with_addresses(
                Version::Two | Command::Proxy,
                Protocol::Stream,
                Addresses::from(pair),
            ),
            None => {
                let local = Builder::with_addresses(
                    Version::Two | Command::Local,
                    Protocol::Unspecified,
                    Addresses::Unspecified,
                );
                return local.build().map_err(err);
            }
        };
        if let Some(r) = &self.router_id {
            b = b.write_tlv(TLV_ROUTER_ID, r.as_bytes()).map_err(err)?;
        }
        if let Some(v) = &self.view_id {
            b = b.write_tlv(TLV_VIEW_ID, &v.0).map_err(err)?;
        }
        if let Some((node, inc)) = &self.intended_owner {
            let mut val = node.as_str().as_bytes().to_vec();
            val.extend_from_slice(&inc.0.to_be_bytes());
            b = b.write_tlv(TLV_INTENDED_OWNER, &val).map_err(err)?;
        }
        if self.takeover {
            b = b.write_tlv(TLV_TAKEOVER, &[1]).map_err(err)?;
        }
        let out = b.build().map_err(err)?;
        if out.len() > MAX_HEADER_LEN {
            return Err(ProxyError::TooLong(out.len()));
        }
        Ok(out)
    }

    /// Parses a header at the start of `buf`. Never reads past
    /// [`MAX_HEADER_LEN`] and never panics.
    pub fn decode(buf: &[u8]) -> Result<Decoded, ProxyError> {
        let sig = buf.len().min(SIGNATURE.len());
        if buf[..sig] != SIGNATURE[..sig] {
            return Err(ProxyError::Signature);
        }
        if buf.len() < FIXED_LEN {
            return Ok(Decoded::NeedMore(FIXED_LEN));
        }
        let total = FIXED_LEN + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if total > MAX_HEADER_LEN {
            return Err(ProxyError::TooLong(total));
        }
        if buf.len() < total {
            return Ok(Decoded::NeedMore(total));
        }
        let header = v2::Header::try_from(&buf[..total])
            .map_err(|e| ProxyError::Malformed(e.to_string()))?;
        let mut out = ProxyHeader::default();
        if header.command == Command::Local {
            // A health check: addresses and TLVs carry no meaning.
            return Ok(Decoded::Done(out, total));
        }
        {
            out.addresses = Some(match header.addresses {
                Addresses::IPv4(a) => (
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                ),
                Addresses::IPv6(a) => (
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                ),
                _ => return Err(ProxyError::NotInet),
            });
        }
        for tlv in header.tlvs() {
            let tlv = tlv.map_err(|e| ProxyError::Malformed(e.to_string()))?;
            let v = &tlv.value;
            match tlv.kind {
                TLV_ROUTER_ID => {
                    let s = std::str::from_utf8(v).map_err(|_| ProxyError::BadTlv(tlv.kind))?;
                    out.router_id = Some(s.to_owned());
                }
                TLV_VIEW_ID => {
                    out.view_id =
                        Some(ViewId::from_slice(v).map_err(|_| ProxyError::BadTlv(tlv.kind))?);
                }
                TLV_INTENDED_OWNER => {
                    let bad = || ProxyError::BadTlv(TLV_INTENDED_OWNER);
                    let split = v.len().checked_sub(8).ok_or_else(bad)?;
                    let name = std::str::from_utf8(&v[..split]).map_err(|_| bad())?;
                    let node = NodeId::new(name).map_err(|_| bad())?;
                    let mut inc = [0u8; 8];
                    inc.copy_from_slice(&v[split..]);
                    out.intended_owner = Some((node, Incarnation(u64::from_be_bytes(inc))));
                }
                TLV_TAKEOVER => {
                    if v[..] != [1u8] {
                        return Err(ProxyError::BadTlv(TLV_TAKEOVER));
                    }
                    out.takeover = true;
                }
                // Other TLVs (e.g. from a standard load balancer) are ignored.
                _ => {}
            }
        }
        Ok(Decoded::Done(out, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> ProxyHeader {
        ProxyHeader {
            addresses: Some((
                "10.1.2.3:4567".parse().unwrap(),
                "127.0.0.1:443".parse().unwrap(),
            )),
            router_id: Some("r1".into()),
            view_id: Some(ViewId([1, 2, 3, 4, 5, 6, 7, 8])),
            intended_owner: Some((NodeId::new("g2").unwrap(), Incarnation(0xdead_beef))),
            takeover: true,
        }
    }

    #[test]
    fn round_trip_v4_v6_local() {
        let h = full();
        let mut bytes = h.encode().unwrap();
        let n = bytes.len();
        bytes.extend_from_slice(b"JVPN trailing preamble");
        assert_eq!(ProxyHeader::decode(&bytes), Ok(Decoded::Done(h, n)));

        let v6 = ProxyHeader {
            addresses: Some((
                "[2001:db8::1]:1000".parse().unwrap(),
                "[::1]:2000".parse().unwrap(),
            )),
            ..Default::default()
        };
        let b = v6.encode().unwrap();
        assert_eq!(ProxyHeader::decode(&b), Ok(Decoded::Done(v6, b.len())));

        let local = ProxyHeader::local();
        let b = local.encode().unwrap();
        match ProxyHeader::decode(&b).unwrap() {
            Decoded::Done(h, _) => assert!(h.is_local()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn partial_input_asks_for_more() {
        let b = full().encode().unwrap();
        assert_eq!(ProxyHeader::decode(&b[..5]), Ok(Decoded::NeedMore(16)));
        assert_eq!(
            ProxyHeader::decode(&b[..20]),
            Ok(Decoded::NeedMore(b.len()))
        );
    }

    #[test]
    fn limits_and_errors() {
        assert_eq!(ProxyHeader::decode(b"JVPN"), Err(ProxyError::Signature));
        let mut b = full().encode().unwrap();
        b[14] = 0x02; // declared length 512+
        b[15] = 0x00;
        assert_eq!(ProxyHeader::decode(&b), Err(ProxyError::TooLong(16 + 512)));
        let mut h = full();
        h.router_id = Some("x".repeat(600));
        assert!(matches!(h.encode(), Err(ProxyError::TooLong(_))));
        let bad_owner = ProxyHeader {
            intended_owner: None,
            ..full()
        };
        let mut bytes = bad_owner.encode().unwrap();
        // Append an intended-owner TLV too short for an incarnation.
        bytes.extend_from_slice(&[TLV_INTENDED_OWNER, 0, 3, b'g', b'1', 0]);
        let len = (bytes.len() - 16) as u16;
        bytes[14..16].copy_from_slice(&len.to_be_bytes());
        assert_eq!(
            ProxyHeader::decode(&bytes),
            Err(ProxyError::BadTlv(TLV_INTENDED_OWNER))
        );
    }

    /// The takeover TLV is one byte `1`; absent means no takeover (every
    /// router before topology 3's takeover), anything else is refused.
    #[test]
    fn takeover_is_explicit_and_exact() {
        let plain = ProxyHeader {
            takeover: false,
            ..full()
        };
        let b = plain.encode().unwrap();
        assert!(!b.windows(2).any(|w| w == [TLV_TAKEOVER, 0]));
        assert_eq!(
            ProxyHeader::decode(&b),
            Ok(Decoded::Done(plain.clone(), b.len()))
        );
        for value in [&[0u8][..], &[2], &[1, 1], &[]] {
            let mut bytes = plain.encode().unwrap();
            bytes.extend_from_slice(&[TLV_TAKEOVER, 0, value.len() as u8]);
            bytes.extend_from_slice(value);
            let len = (bytes.len() - 16) as u16;
            bytes[14..16].copy_from_slice(&len.to_be_bytes());
            assert_eq!(
                ProxyHeader::decode(&bytes),
                Err(ProxyError::BadTlv(TLV_TAKEOVER)),
                "{value:?}"
            );
        }
    }
}
