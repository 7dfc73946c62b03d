//! Frames inside TLS: a u32 big-endian length, then a prost-encoded `Frame`.
//!
//! The length is checked against [`MAX_FRAME_LEN`] before any buffer grows, so a
//! peer announcing 4 GiB costs nothing; the error closes that connection only.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;

use crate::pb::session::{Frame, frame::Kind};

/// Largest frame body accepted or sent (64 KiB).
pub const MAX_FRAME_LEN: usize = 64 * 1024;
const LEN_PREFIX: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The announced or encoded length exceeds [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes exceeds {MAX_FRAME_LEN}")]
    TooLarge(usize),
    /// The body was not a valid `Frame` message.
    #[error("malformed frame: {0}")]
    Decode(String),
    /// The body decoded but carried no frame kind.
    #[error("frame without a kind")]
    Empty,
}

impl FrameError {
    /// The reason code a gateway reports for this error.
    pub fn reason(&self) -> crate::ReasonCode {
        match self {
            FrameError::TooLarge(_) => crate::ReasonCode::FrameTooLarge,
            _ => crate::ReasonCode::ProtocolError,
        }
    }
}

/// Appends one length-prefixed frame to `dst`.
pub fn encode(kind: Kind, dst: &mut BytesMut) -> Result<(), FrameError> {
    let frame = Frame { kind: Some(kind) };
    let len = frame.encoded_len();
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    dst.reserve(LEN_PREFIX + len);
    dst.put_u32(len as u32);
    frame
        .encode(dst)
        .map_err(|e| FrameError::Decode(e.to_string()))
}

/// Convenience: one frame as a fresh buffer.
pub fn to_bytes(kind: Kind) -> Result<BytesMut, FrameError> {
    let mut b = BytesMut::new();
    encode(kind, &mut b)?;
    Ok(b)
}

/// Takes one complete frame off the front of `src`, if there is one.
///
/// `Ok(None)`: need more bytes (at most `MAX_FRAME_LEN + 4` are reserved).
pub fn decode(src: &mut BytesMut) -> Result<Option<Kind>, FrameError> {
    if src.len() < LEN_PREFIX {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    if src.len() < LEN_PREFIX + len {
        src.reserve(LEN_PREFIX + len - src.len());
        return Ok(None);
    }
    src.advance(LEN_PREFIX);
    let body = src.split_to(len);
    let frame = Frame::decode(body.freeze()).map_err(|e| FrameError::Decode(e.to_string()))?;
    frame.kind.ok_or(FrameError::Empty).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::session::{Data, Ping, Reject};

    #[test]
    fn round_trip_several_frames_split_anywhere() {
        let frames = vec![
            Kind::Ping(Ping { seq: 1 }),
            Kind::Data(Data {
                seq: 2,
                payload: vec![7u8; 1000].into(),
            }),
            Kind::Reject(Reject {
                reason: 8,
                retry_after_ms: 5,
                current_binding_epoch: 3,
                transport_lost_deadline_ms: 9,
            }),
        ];
        let mut wire = BytesMut::new();
        for f in &frames {
            encode(f.clone(), &mut wire).unwrap();
        }
        let wire = wire.freeze();
        for split in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..split]);
            let mut got = Vec::new();
            while let Some(k) = decode(&mut buf).unwrap() {
                got.push(k);
            }
            buf.extend_from_slice(&wire[split..]);
            while let Some(k) = decode(&mut buf).unwrap() {
                got.push(k);
            }
            assert_eq!(got, frames, "split at {split}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn oversize_is_refused_without_allocating() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0][..]);
        let cap = buf.capacity();
        assert_eq!(
            decode(&mut buf),
            Err(FrameError::TooLarge(u32::MAX as usize))
        );
        assert_eq!(buf.capacity(), cap);
        let big = Kind::Data(Data {
            seq: 0,
            payload: vec![0; MAX_FRAME_LEN].into(),
        });
        assert!(matches!(to_bytes(big), Err(FrameError::TooLarge(_))));
        assert_eq!(
            FrameError::TooLarge(1).reason(),
            crate::ReasonCode::FrameTooLarge
        );
    }

    #[test]
    fn empty_and_garbage_bodies_are_typed_errors() {
        let mut buf = BytesMut::from(&[0, 0, 0, 0][..]);
        assert_eq!(decode(&mut buf), Err(FrameError::Empty));
        let mut buf = BytesMut::from(&[0, 0, 0, 2, 0xff, 0xff][..]);
        assert!(matches!(decode(&mut buf), Err(FrameError::Decode(_))));
    }
}
