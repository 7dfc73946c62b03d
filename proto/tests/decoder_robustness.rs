//! Every decoder takes ≥ 100k random and mutated inputs without panicking,
//! without growing buffers past the frame limit, and with typed errors.

#![allow(clippy::unwrap_used)]

use bytes::BytesMut;
use jvpn_proto::frame::{self, MAX_FRAME_LEN};
use jvpn_proto::keys::ClusterSecret;
use jvpn_proto::pb::session::{Data, Resume, frame::Kind};
use jvpn_proto::preamble::{PREAMBLE_LEN, Preamble, StatusReply};
use jvpn_proto::proxy::{Decoded, ProxyHeader};
use jvpn_proto::token::{TOKEN_LEN, TokenContents, TokenKey};
use jvpn_proto::{Incarnation, NodeId, OwnerTag, SessionId, ViewId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const N: usize = 100_000;

/// Random bytes, or a valid sample with a few random byte edits, truncation or extension.
fn input(rng: &mut ChaCha8Rng, valid: &[u8], max_len: usize) -> Vec<u8> {
    if rng.random_bool(0.3) {
        let len = rng.random_range(0..=max_len);
        return (0..len).map(|_| rng.random()).collect();
    }
    let mut v = valid.to_vec();
    for _ in 0..rng.random_range(1..4) {
        match rng.random_range(0..4) {
            0 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] = rng.random();
            }
            1 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] ^= 1 << rng.random_range(0..8);
            }
            2 => v.truncate(rng.random_range(0..=v.len())),
            _ => v.extend((0..rng.random_range(0..16)).map(|_| rng.random::<u8>())),
        }
    }
    v
}

#[test]
fn preamble_and_status_decoders_never_panic() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let valid = Preamble::Resume {
        key_id: 1,
        token: [3; TOKEN_LEN],
    }
    .encode();
    let mut ok = 0;
    for _ in 0..N {
        let mut v = input(&mut rng, &valid, 80);
        v.resize(PREAMBLE_LEN, 0);
        let arr: [u8; PREAMBLE_LEN] = v[..].try_into().unwrap();
        if Preamble::decode(&arr).is_ok() {
            ok += 1;
        }
        let s: [u8; 8] = arr[..8].try_into().unwrap();
        let _ = StatusReply::decode(&s);
    }
    assert!(
        ok > 0 && ok < N,
        "mutations should both pass and fail: {ok}"
    );
}

#[test]
fn forged_or_mutated_tokens_never_open() {
    let key = TokenKey::new(&ClusterSecret::new(1, [9; 32]).derive());
    let genuine = key.seal(
        [1; 12],
        &TokenContents {
            session_id: SessionId::from_bytes([4; 16]),
            owner_tag: OwnerTag([2; 8]),
        },
    );
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for _ in 0..N {
        let mut v = input(&mut rng, &genuine, TOKEN_LEN);
        v.resize(TOKEN_LEN, 0);
        let t: [u8; TOKEN_LEN] = v[..].try_into().unwrap();
        if t != genuine {
            assert!(key.open(&t).is_err(), "a forged token opened");
        }
    }
    assert!(key.open(&genuine).is_ok());
}

#[test]
fn proxy_decoder_never_panics_or_overreads() {
    let valid = ProxyHeader {
        addresses: Some((
            "192.0.2.1:1234".parse().unwrap(),
            "198.51.100.2:7443".parse().unwrap(),
        )),
        router_id: Some("r1".into()),
        view_id: Some(ViewId([1; 8])),
        intended_owner: Some((NodeId::new("g1").unwrap(), Incarnation(5))),
        takeover: true,
    }
    .encode()
    .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (mut done, mut more, mut err) = (0, 0, 0);
    for _ in 0..N {
        let v = input(&mut rng, &valid, 600);
        match ProxyHeader::decode(&v) {
            Ok(Decoded::Done(_, used)) => {
                assert!(used <= v.len() && used <= 512);
                done += 1;
            }
            Ok(Decoded::NeedMore(n)) => {
                assert!(n > v.len() && n <= 512);
                more += 1;
            }
            Err(_) => err += 1,
        }
    }
    assert!(done > 0 && more > 0 && err > 0, "{done} {more} {err}");
}

#[test]
fn frame_decoder_never_panics_or_overallocates() {
    let mut valid = BytesMut::new();
    frame::encode(
        Kind::Data(Data {
            seq: 9,
            payload: vec![1; 40].into(),
        }),
        &mut valid,
    )
    .unwrap();
    frame::encode(
        Kind::Resume(Resume {
            keepalive: false,
            session_id: vec![1; 16],
            counter: 3,
            binding_epoch: 1,
            proof: vec![2; 32],
            received: Some(1 << 20),
        }),
        &mut valid,
    )
    .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (mut frames, mut errors) = (0, 0);
    for _ in 0..N {
        let v = input(&mut rng, &valid, 200);
        let mut buf = BytesMut::from(&v[..]);
        loop {
            match frame::decode(&mut buf) {
                Ok(Some(_)) => frames += 1,
                Ok(None) => break,
                Err(_) => {
                    errors += 1;
                    break;
                }
            }
        }
        assert!(
            buf.capacity() <= MAX_FRAME_LEN + 4 + v.len(),
            "buffer grew past the limit"
        );
    }
    assert!(frames > 0 && errors > 0, "{frames} {errors}");
}

/// Heartbeat requests and replies, and the view a gateway rebuilds from a
/// reply: 100k mutations of the kept corpus inputs through the fuzz entry.
#[test]
fn membership_messages_never_panic() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/heartbeat");
    let seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(seeds.len() >= 4);
    for i in 0..N {
        let v = input(&mut rng, &seeds[i % seeds.len()], 400);
        jvpn_proto::fuzzing::heartbeat(&v);
    }
}
