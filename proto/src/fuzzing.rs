//! Entry points shared by the `cargo fuzz` targets (`fuzz/`) and the corpus
//! regression test: each feeds arbitrary bytes to one decoder and checks that
//! whatever decodes also re-encodes to the same value.

use bytes::BytesMut;

/// Replays the kept corpus of `target` (`fuzz/corpus/<target>/`) through
/// `f`, the target's entry point, so every input a fuzzer once found
/// interesting stays a regression test; fails with fewer than
/// `min_inputs` inputs. For tests in any crate of the workspace.
pub fn replay_corpus(target: &str, f: fn(&[u8]), min_inputs: usize) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.map(|e| e.path()).unwrap_or_else(|e| panic!("{e}"));
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        f(&data);
        n += 1;
    }
    assert!(n >= min_inputs, "{target}: corpus has only {n} inputs");
}

use crate::frame;
use crate::keys::ClusterSecret;
use crate::preamble::{PREAMBLE_LEN, Preamble, STATUS_LEN, StatusReply};
use crate::proxy::{Decoded, MAX_HEADER_LEN, ProxyHeader};
use crate::token::{TOKEN_LEN, TokenKey};

/// Preamble and status reply decoders.
pub fn preamble(data: &[u8]) {
    let head = |n: usize| data.get(..n);
    if let Some(Ok(buf)) = head(PREAMBLE_LEN).map(<&[u8; PREAMBLE_LEN]>::try_from)
        && let Ok(p) = Preamble::decode(buf)
    {
        let again = Preamble::decode(&p.encode());
        assert_eq!(again.as_ref(), Ok(&p), "preamble does not round-trip");
    }
    if let Some(Ok(buf)) = head(STATUS_LEN).map(<&[u8; STATUS_LEN]>::try_from)
        && let Ok(s) = StatusReply::decode(buf)
    {
        assert_eq!(&s.encode(), buf, "status reply does not round-trip");
    }
}

/// Token opening under a fixed key: arbitrary bytes must never open.
pub fn token(data: &[u8]) {
    let key = TokenKey::new(&ClusterSecret::new(1, [0x11; 32]).derive());
    if let Some(buf) = data
        .get(..TOKEN_LEN)
        .and_then(|b| <&[u8; TOKEN_LEN]>::try_from(b).ok())
    {
        // Forging a Poly1305 tag by chance is not something a fuzzer does.
        assert!(key.open(buf).is_err(), "an unsealed token opened");
    }
}

/// PROXY v2 header decoder.
pub fn proxy(data: &[u8]) {
    match ProxyHeader::decode(data) {
        Ok(Decoded::Done(h, used)) => {
            assert!(used <= data.len() && used <= MAX_HEADER_LEN);
            if let Ok(bytes) = h.encode() {
                match ProxyHeader::decode(&bytes) {
                    Ok(Decoded::Done(again, n)) => {
                        assert_eq!(again, h, "PROXY header does not round-trip");
                        assert_eq!(n, bytes.len());
                    }
                    other => panic!("re-encoded header does not decode: {other:?}"),
                }
            }
        }
        Ok(Decoded::NeedMore(n)) => assert!(n > data.len() && n <= MAX_HEADER_LEN),
        Err(_) => {}
    }
}

/// Frame decoder, fed the whole input as a stream.
pub fn frame(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(kind)) = frame::decode(&mut buf) {
        let mut enc = frame::to_bytes(kind.clone()).expect("a decoded frame re-encodes");
        assert_eq!(
            frame::decode(&mut enc),
            Ok(Some(kind)),
            "frame does not round-trip"
        );
    }
    assert!(buf.capacity() <= frame::MAX_FRAME_LEN + 4 + data.len());
}

/// Membership messages: heartbeat requests and replies decode without
/// panicking and round-trip; a reply's view is rebuilt the way a gateway
/// does, and one that is accepted carries the id it was checked against.
pub fn heartbeat(data: &[u8]) {
    use prost::Message;

    use crate::pb::membership::{HeartbeatReply, HeartbeatRequest};
    if let Ok(req) = HeartbeatRequest::decode(data) {
        let again = HeartbeatRequest::decode(req.encode_to_vec().as_slice());
        assert_eq!(
            again.as_ref(),
            Ok(&req),
            "heartbeat request does not round-trip"
        );
    }
    if let Ok(reply) = HeartbeatReply::decode(data) {
        let again = HeartbeatReply::decode(reply.encode_to_vec().as_slice());
        assert_eq!(
            again.as_ref(),
            Ok(&reply),
            "heartbeat reply does not round-trip"
        );
        let keys = ClusterSecret::new(1, [0x22; 32]).derive();
        if let Ok(Some(view)) = crate::ring::view_from_reply(&reply, &keys) {
            assert_eq!(view.id().0.as_slice(), reply.view_id.as_slice());
            assert!(!view.is_empty());
        }
        // The same reply as a delta from a small fixed view: whatever it
        // adds or removes, a result is a valid view with the id it names.
        let base = crate::ring::View::new(
            vec![crate::ring::Member {
                node_id: crate::NodeId::new("g1").unwrap_or_else(|_| unreachable!()),
                incarnation: crate::Incarnation(1),
                addr: std::net::SocketAddr::from(([10, 0, 0, 1], 7443)),
                weight: 1,
            }],
            crate::ring::RingParams::default(),
            &keys,
        );
        if let Ok(base) = base
            && let Ok(Some(view)) = crate::ring::view_from_delta(&base, &reply, &keys)
        {
            assert_eq!(view.id().0.as_slice(), reply.view_id.as_slice());
        }
    }
}

/// The session channel fed arbitrary peer input: `Data` at any offset and
/// size, acks and resume offsets of any value, interleaved with local
/// writes, sends and reads. Every peer error is typed, and the offsets
/// keep their order whatever the input.
pub fn channel(data: &[u8]) {
    use crate::channel::{Channel, ChannelConfig};
    use crate::time::Mono;

    let mut c = Channel::new(ChannelConfig {
        max_payload: 512,
        ..ChannelConfig::with_window(4_096)
    });
    let mut src = data;
    let mut take = |n: usize| -> Option<Vec<u8>> {
        let (a, b) = src.split_at_checked(n)?;
        src = b;
        Some(a.to_vec())
    };
    let u64_of = |b: Vec<u8>| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    let mut now = 0u64;
    while let Some(op) = take(1) {
        // Offsets near the live range as often as anywhere.
        let near = |raw: u64, base: u64| {
            if raw & 1 == 0 {
                base.wrapping_add((raw >> 1) % 8_192).wrapping_sub(4_096)
            } else {
                raw
            }
        };
        match op[0] % 7 {
            0 => {
                let Some(seq) = take(8).map(u64_of) else {
                    break;
                };
                let Some(len) = take(1) else { break };
                let payload = bytes::Bytes::from(vec![0xab; usize::from(len[0]) * 8]);
                let _ = c.on_data(near(seq, c.received()), payload);
            }
            1 => {
                let Some(a) = take(8).map(u64_of) else { break };
                let _ = c.on_ack(near(a, c.acked()));
            }
            2 => {
                let Some(a) = take(8).map(u64_of) else { break };
                let _ = c.resume_from(near(a, c.acked()));
            }
            3 => {
                let Some(n) = take(2) else { break };
                c.write(&vec![1; usize::from(u16::from_le_bytes([n[0], n[1]]))]);
            }
            4 => {
                if let Some((seq, p)) = c.next_data() {
                    assert!(p.len() <= 512 && !p.is_empty());
                    assert!(seq + p.len() as u64 <= c.end());
                }
            }
            5 => {
                let Some(n) = take(2) else { break };
                let unread = c.received() - c.consumed();
                let n = u64::from(u16::from_le_bytes([n[0], n[1]])).min(unread);
                now += 7;
                c.consume(n as usize, Mono::from_millis(now));
            }
            _ => {
                now += 20;
                let _ = c.ack_due(Mono::from_millis(now), false);
            }
        }
        assert!(c.acked() <= c.sent() && c.sent() <= c.end());
        assert!(c.buffered() <= 4_096);
        assert!(c.consumed() <= c.received());
    }
}

/// Store record decoder (a value read from etcd): whatever decodes
/// re-encodes to the same record, and no wrapped key in it opens under a
/// key the fuzzer does not hold.
pub fn store_record(data: &[u8]) {
    use crate::store_record::{decode, encode, open_record_key};
    let Ok(rec) = decode(data) else {
        return;
    };
    assert_eq!(
        decode(&encode(&rec)).as_ref(),
        Ok(&rec),
        "store record does not round-trip"
    );
    let keys = ClusterSecret::new(1, [0x22; 32]).derive();
    let sid = crate::SessionId::from_bytes([0x33; 16]);
    assert!(
        open_record_key([&keys], &sid, &rec).is_err(),
        "an unsealed resume key opened"
    );
}
