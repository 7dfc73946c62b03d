#![allow(clippy::unwrap_used)]

use super::*;
use proptest::prelude::*;

fn ms(n: u64) -> Mono {
    Mono::from_millis(n)
}

/// Byte `i` of a direction's stream: a non-periodic pattern (splitmix64
/// of the offset), so any loss, duplication or reordering shows as a
/// mismatch at its offset.
fn byte(dir: u8, i: u64) -> u8 {
    let mut z = (i ^ (u64::from(dir) << 63)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u8
}

fn stream(dir: u8, from: u64, n: usize) -> Vec<u8> {
    (from..from + n as u64).map(|i| byte(dir, i)).collect()
}

#[test]
fn the_window_bounds_what_a_writer_may_add() {
    let mut c = Channel::new(ChannelConfig::with_window(100));
    assert_eq!(c.write(&[1; 70]), 70);
    assert_eq!(c.write(&[2; 70]), 30, "only the window's rest");
    assert_eq!(c.write(&[3; 1]), 0, "full: backpressure, not a drop");
    let (seq, p) = c.next_data().unwrap();
    assert_eq!((seq, p.len()), (0, 100));
    assert!(c.next_data().is_none());
    c.on_ack(40).unwrap();
    assert_eq!(c.space(), 40);
    c.on_ack(100).unwrap();
    assert_eq!(c.buffered(), 0);
}

#[test]
fn data_is_cut_to_the_largest_payload_across_chunks() {
    let mut c = Channel::new(ChannelConfig {
        max_payload: 10,
        ..ChannelConfig::default()
    });
    for piece in stream(0, 0, 25).chunks(3) {
        c.write(piece);
    }
    let mut got = Vec::new();
    while let Some((seq, p)) = c.next_data() {
        assert_eq!(seq, got.len() as u64);
        assert!(p.len() <= 10);
        got.extend_from_slice(&p);
    }
    assert_eq!(got, stream(0, 0, 25));
}

#[test]
fn an_idle_channel_holds_no_buffer() {
    let mut c = Channel::new(ChannelConfig::default());
    for _ in 0..100 {
        c.write(&[7; 1000]);
    }
    while c.next_data().is_some() {}
    c.on_ack(c.sent()).unwrap();
    assert_eq!(c.buffered(), 0);
    assert_eq!(c.queue.capacity(), 0, "the queue's memory was given back");
}

/// Many tiny writes, each sent as it comes while the peer acknowledges
/// nothing (a peer that never acks, a destination trickling bytes): the
/// queue holds the window's bytes in few chunks, not one chunk per write
/// (each costs far more than its 17 bytes, and `next_data` scans them),
/// and the bytes are the ones written, in order, on a resend too.
#[test]
fn tiny_writes_sent_one_by_one_make_few_chunks() {
    let window = 1 << 20;
    let mut c = Channel::new(ChannelConfig::with_window(window));
    let data = stream(0, 0, window as usize);
    let mut at = 0;
    let mut sent = Vec::new();
    while at < data.len() {
        let n = c.write(&data[at..(at + 17).min(data.len())]);
        assert!(n > 0);
        at += n;
        while let Some((seq, p)) = c.next_data() {
            assert_eq!(seq, sent.len() as u64);
            sent.extend_from_slice(&p);
        }
    }
    assert!(sent == data);
    assert!(
        c.queue.len() as u64 <= 2 * window / SMALL_CHUNK as u64 + 1,
        "{} chunks for {window} bytes",
        c.queue.len()
    );
    // Everything again after a resume from the start.
    c.resume_from(0).unwrap();
    let mut again = Vec::new();
    while let Some((_, p)) = c.next_data() {
        again.extend_from_slice(&p);
    }
    assert!(again == data);
}

#[test]
fn acks_and_resume_offsets_outside_the_rules_are_errors() {
    let mut c = Channel::new(ChannelConfig::default());
    c.write(&[1; 50]);
    c.next_data();
    assert_eq!(
        c.on_ack(51),
        Err(ChannelError::AckOutOfRange {
            ack: 51,
            acked: 0,
            sent: 50
        }),
        "an ack for bytes never sent"
    );
    c.on_ack(20).unwrap();
    assert!(
        matches!(c.on_ack(10), Err(ChannelError::AckOutOfRange { .. })),
        "acks never go back"
    );
    assert!(
        matches!(
            c.resume_from(10),
            Err(ChannelError::ResumeOutOfRange { .. })
        ),
        "the peer lost bytes it had acknowledged"
    );
    assert!(
        matches!(
            c.resume_from(51),
            Err(ChannelError::ResumeOutOfRange { .. })
        ),
        "the peer claims bytes never written"
    );
    let mut d = Channel::new(ChannelConfig {
        max_payload: 50,
        ..ChannelConfig::default()
    });
    d.write(&[1; 100]);
    d.next_data();
    assert!(
        matches!(
            d.resume_from(80),
            Err(ChannelError::ResumeOutOfRange { .. })
        ),
        "written but never sent: the peer cannot hold it"
    );
    c.resume_from(30).unwrap();
    let (seq, p) = c.next_data().unwrap();
    assert_eq!((seq, p.len()), (30, 20), "resent from the peer's offset");
}

#[test]
fn received_data_must_be_contiguous_within_the_window() {
    let mut r = Channel::new(ChannelConfig::with_window(100));
    assert_eq!(
        r.on_data(5, Bytes::from_static(b"x")),
        Err(ChannelError::Gap {
            expected: 0,
            got: 5
        })
    );
    assert_eq!(
        &r.on_data(0, Bytes::from(vec![1; 60])).unwrap()[..],
        &[1; 60]
    );
    // A resend that overlaps: only the new part comes out.
    let fresh = r.on_data(50, Bytes::from(vec![2; 20])).unwrap();
    assert_eq!(fresh.len(), 10);
    assert_eq!(r.received(), 70);
    assert!(r.on_data(10, Bytes::from(vec![1; 5])).unwrap().is_empty());
    // Nothing consumed: 100 bytes is the most the sender may hold.
    assert!(matches!(
        r.on_data(70, Bytes::from(vec![3; 31])),
        Err(ChannelError::OverWindow { .. })
    ));
    assert_eq!(
        r.on_data(u64::MAX, Bytes::from_static(b"ab")),
        Err(ChannelError::Overflow)
    );
}

#[test]
fn acks_are_batched_by_bytes_or_delay() {
    let mut r = Channel::new(ChannelConfig::default());
    r.on_data(0, Bytes::from(vec![0; 200_000])).unwrap();
    r.consume(1_000, ms(0));
    assert_eq!(r.ack_due(ms(10), false), None, "small and recent: wait");
    assert_eq!(r.ack_deadline(), Some(ms(50)));
    assert_eq!(r.ack_due(ms(50), false), Some(1_000), "the delay passed");
    r.consume(64 * 1024, ms(60));
    assert_eq!(
        r.ack_due(ms(60), false),
        Some(1_000 + 64 * 1024),
        "enough bytes"
    );
    r.consume(1, ms(70));
    assert_eq!(r.ack_due(ms(70), true), Some(1_001 + 64 * 1024), "forced");
    assert_eq!(r.ack_due(ms(500), true), None, "nothing new");
    // A new transport: the last ack may be lost, say it again.
    r.resume_from(0).unwrap();
    assert_eq!(r.ack_due(ms(501), false), Some(1_001 + 64 * 1024));
}

/// What happens next in the two-sided simulation.
#[derive(Clone, Debug)]
enum Op {
    /// Side writes up to n bytes of its stream.
    Write(bool, usize),
    /// Side puts its next Data frame on the transport.
    Send(bool),
    /// The transport delivers up to n frames towards side.
    Deliver(bool, usize),
    /// Side's application reads up to n bytes.
    Read(bool, usize),
    /// Time passes; each side sends the acks that are due.
    Tick(u64),
    /// The transport dies with whatever was in flight; a new one resumes.
    /// Each side reports an offset between what the sender knows was
    /// consumed and what arrived (the fraction, in 1/256ths: a peer may
    /// report less than it holds, and then gets an overlapping resend).
    Jump(u8, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (any::<bool>(), 1usize..5_000).prop_map(|(s, n)| Op::Write(s, n)),
        4 => any::<bool>().prop_map(Op::Send),
        4 => (any::<bool>(), 1usize..8).prop_map(|(s, n)| Op::Deliver(s, n)),
        2 => (any::<bool>(), 1usize..6_000).prop_map(|(s, n)| Op::Read(s, n)),
        1 => (1u64..80).prop_map(Op::Tick),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::Jump(a, b)),
    ]
}

#[derive(Debug)]
enum Wire {
    Data(u64, Bytes),
    Ack(u64),
}

struct Side {
    ch: Channel,
    dir: u8,
    written: u64,
    /// Received, not yet read by the application.
    inbox: VecDeque<u8>,
    read: Vec<u8>,
}

impl Side {
    fn new(dir: u8, window: u64) -> Self {
        Self {
            ch: Channel::new(ChannelConfig {
                max_payload: 1_500,
                ..ChannelConfig::with_window(window)
            }),
            dir,
            written: 0,
            inbox: VecDeque::new(),
            read: Vec::new(),
        }
    }
}

struct Sim {
    sides: [Side; 2],
    /// In flight towards side i.
    wire: [VecDeque<Wire>; 2],
    now: u64,
    window: u64,
    jumps: u32,
}

impl Sim {
    fn step(&mut self, op: Op) -> Result<(), ChannelError> {
        match op {
            Op::Write(s, n) => {
                let me = &mut self.sides[usize::from(s)];
                let data = stream(me.dir, me.written, n);
                me.written += me.ch.write(&data) as u64;
            }
            Op::Send(s) => {
                if let Some((seq, p)) = self.sides[usize::from(s)].ch.next_data() {
                    self.wire[usize::from(!s)].push_back(Wire::Data(seq, p));
                }
            }
            Op::Deliver(s, n) => {
                for _ in 0..n {
                    let Some(w) = self.wire[usize::from(s)].pop_front() else {
                        break;
                    };
                    let me = &mut self.sides[usize::from(s)];
                    match w {
                        Wire::Data(seq, p) => me.inbox.extend(me.ch.on_data(seq, p)?),
                        Wire::Ack(a) => me.ch.on_ack(a)?,
                    }
                    // The receiver's buffer never exceeds the window.
                    assert!(me.inbox.len() as u64 <= self.window);
                }
            }
            Op::Read(s, n) => {
                let me = &mut self.sides[usize::from(s)];
                let n = n.min(me.inbox.len());
                me.read.extend(me.inbox.drain(..n));
                me.ch.consume(n, Mono::from_millis(self.now));
            }
            Op::Tick(d) => {
                self.now += d;
                self.acks(false);
            }
            Op::Jump(fa, fb) => {
                self.jumps += 1;
                self.wire = [VecDeque::new(), VecDeque::new()];
                // What side i reports: between what its peer has released
                // (acked) and what it received.
                let report = |me: &Side, peer: &Side, f: u8| {
                    let (lo, hi) = (peer.ch.acked(), me.ch.received());
                    lo + (hi - lo) * u64::from(f) / 255
                };
                let offsets = [
                    report(&self.sides[0], &self.sides[1], fa),
                    report(&self.sides[1], &self.sides[0], fb),
                ];
                self.sides[0].ch.resume_from(offsets[1])?;
                self.sides[1].ch.resume_from(offsets[0])?;
                self.acks(false);
            }
        }
        Ok(())
    }

    fn acks(&mut self, force: bool) {
        let now = Mono::from_millis(self.now);
        for s in [false, true] {
            if let Some(a) = self.sides[usize::from(s)].ch.ack_due(now, force) {
                self.wire[usize::from(!s)].push_back(Wire::Ack(a));
            }
        }
    }

    /// No more faults: move everything until both directions are drained.
    fn drain(&mut self) -> Result<(), ChannelError> {
        for _ in 0..100_000 {
            let idle = self.wire.iter().all(VecDeque::is_empty)
                && self.sides.iter().all(|s| s.ch.sent() == s.ch.end());
            let read_all = self.sides.iter().all(|s| s.inbox.is_empty());
            if idle && read_all && self.sides.iter().all(|s| s.ch.buffered() == 0) {
                return Ok(());
            }
            self.step(Op::Send(false))?;
            self.step(Op::Send(true))?;
            self.step(Op::Deliver(false, 64))?;
            self.step(Op::Deliver(true, 64))?;
            self.step(Op::Read(false, usize::MAX))?;
            self.step(Op::Read(true, usize::MAX))?;
            // Acks only as the channel decides (by bytes or delay): a lost
            // ack that nobody repeats shows up as a window never released.
            self.now += 60;
            self.acks(false);
        }
        panic!("the channel did not drain");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any interleaving of writes, sends, deliveries, reads, ack timers and
    /// transport deaths (frames in flight lost): each side reads exactly the
    /// other's stream, no byte lost, duplicated or reordered, no receive
    /// buffer beyond the window, and once faults stop everything drains
    /// and every buffer is released.
    #[test]
    fn jumps_lose_and_duplicate_nothing(
        window in prop_oneof![Just(4_096u64), Just(65_536u64), Just(1u64 << 20)],
        ops in proptest::collection::vec(op(), 1..400),
    ) {
        let mut sim = Sim {
            sides: [Side::new(0, window), Side::new(1, window)],
            wire: [VecDeque::new(), VecDeque::new()],
            now: 0,
            window,
            jumps: 0,
        };
        for op in ops {
            sim.step(op).unwrap();
            for (i, s) in sim.sides.iter().enumerate() {
                let peer = &sim.sides[1 - i];
                prop_assert!(s.ch.buffered() <= window);
                prop_assert_eq!(&s.read[..], &stream(peer.dir, 0, s.read.len())[..]);
            }
        }
        sim.drain().unwrap();
        for (i, s) in sim.sides.iter().enumerate() {
            let peer = &sim.sides[1 - i];
            prop_assert_eq!(s.read.len() as u64, peer.written);
            prop_assert_eq!(&s.read[..], &stream(peer.dir, 0, s.read.len())[..]);
        }
    }
}

/// Rolling upgrades: every `Data` frame a channel makes at the default
/// configuration, even at the largest offsets (longest varint), fits the
/// 64 KiB frame limit that every released peer enforces, so an agent or
/// gateway one version older decodes it; and a frame of the old 16 KiB
/// size still decodes here.
#[test]
fn default_data_frames_fit_the_frame_limit_of_every_released_peer() {
    use crate::frame::{MAX_FRAME_LEN, decode, encode};
    use crate::pb::session::{Data, frame::Kind};
    let cfg = ChannelConfig::default();
    assert!(cfg.max_payload > 16 * 1024, "larger than the old payload");
    let mut c = Channel::new(cfg);
    c.write(&vec![7u8; cfg.window as usize]);
    let mut frames = 0;
    while let Some((_, payload)) = c.next_data() {
        for seq in [0, u64::MAX - payload.len() as u64] {
            let mut wire = BytesMut::new();
            encode(
                Kind::Data(Data {
                    seq,
                    payload: payload.clone(),
                }),
                &mut wire,
            )
            .unwrap();
            assert!(
                wire.len() - 4 <= MAX_FRAME_LEN,
                "{} bytes over the frame limit",
                wire.len() - 4
            );
            assert!(matches!(decode(&mut wire), Ok(Some(Kind::Data(_)))));
        }
        frames += 1;
    }
    assert_eq!(frames, (cfg.window as usize).div_ceil(cfg.max_payload));
    let old = Kind::Data(Data {
        seq: 5,
        payload: vec![1u8; 16 * 1024].into(),
    });
    let mut wire = BytesMut::new();
    encode(old, &mut wire).unwrap();
    assert!(matches!(decode(&mut wire), Ok(Some(Kind::Data(d))) if d.payload.len() == 16 * 1024));
}
