//! The resumable session channel (DESIGN §12), sans-IO: each direction of a
//! session is one byte stream numbered by offset. The sender keeps every
//! byte the peer has not acknowledged, up to a window, and after a transport
//! change resends from the offset the peer says it holds, so a jump loses
//! and duplicates nothing.
//!
//! Offsets:
//! - sending: `acked ≤ sent ≤ max_sent ≤ end`. Bytes below `acked` are gone
//!   (the peer consumed them); `[acked, end)` is buffered; `[sent, end)` is
//!   not yet on the current transport; `max_sent` is the furthest any
//!   transport carried, the most a peer can claim to hold. `end - acked ≤ window` (backpressure: a writer
//!   gets no more room, nothing is dropped).
//! - receiving: `consumed ≤ received`. `received` is what arrived (the
//!   offset a RESUME reports); `consumed` what the application took, the
//!   offset an `Ack` reports, so unread bytes keep the sender's window full
//!   and the receiver's buffer is bounded by the sender's window.
//!
//! The caller owns the I/O: it turns [`Channel::next_data`] into `Data`
//! frames, hands arriving `Data` / `Ack` to [`Channel::on_data`] /
//! [`Channel::on_ack`], sends an `Ack` when [`Channel::ack_due`] says so,
//! and after a RESUME calls [`Channel::resume_from`] with the peer's offset.
//! Buffers exist only while bytes are unacknowledged: an idle channel
//! holds an empty queue.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::time::Mono;

/// Sizes and ack batching of one channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelConfig {
    /// Unacknowledged bytes the sender may hold (per direction).
    pub window: u64,
    /// Largest `Data` payload produced (at least 1).
    pub max_payload: usize,
    /// Acknowledge after this many consumed bytes...
    pub ack_bytes: u64,
    /// ...or this long after the first unacknowledged one.
    pub ack_delay: Duration,
}

impl ChannelConfig {
    /// The default window, 1 MiB per direction.
    pub const DEFAULT_WINDOW: u64 = 1 << 20;

    /// Defaults for `window`: acks every 64 KiB (a quarter of a smaller
    /// window, so a small window never waits for the timer) or 50 ms.
    pub fn with_window(window: u64) -> Self {
        Self {
            window: window.max(1),
            max_payload: 60 * 1024,
            ack_bytes: (64 * 1024).min(window / 4).max(1),
            ack_delay: Duration::from_millis(50),
        }
    }
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self::with_window(Self::DEFAULT_WINDOW)
    }
}

/// A peer broke the channel's rules; the session's channel must end (a
/// protocol error, explicit, never a silent repair).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// `Data` that starts past what arrived: bytes in between are missing.
    #[error("data at offset {got} leaves a gap after {expected}")]
    Gap { expected: u64, got: u64 },
    /// `Data` past the window the sender may hold unacknowledged.
    #[error("data up to {end} exceeds the window (consumed {consumed}, window {window})")]
    OverWindow {
        end: u64,
        consumed: u64,
        window: u64,
    },
    /// An `Ack` outside `[acked, max_sent]`.
    #[error("ack {ack} outside [{acked}, {sent}]")]
    AckOutOfRange { ack: u64, acked: u64, sent: u64 },
    /// A resume offset outside `[acked, max_sent]`: the peer claims bytes
    /// never sent, or lost bytes it had acknowledged.
    #[error("resume offset {offset} outside [{acked}, {sent}]")]
    ResumeOutOfRange { offset: u64, acked: u64, sent: u64 },
    /// Offsets would pass 2^64.
    #[error("offset overflow")]
    Overflow,
}

/// Sealed chunks below this merge with a small chunk before them.
const SMALL_CHUNK: usize = 4 * 1024;

/// One direction pair of a session's byte streams.
#[derive(Debug)]
pub struct Channel {
    cfg: ChannelConfig,
    // Sending.
    acked: u64,
    sent: u64,
    max_sent: u64,
    end: u64,
    /// Bytes `[acked, end - tail.len())`, oldest first.
    queue: VecDeque<Bytes>,
    /// The newest written bytes, `[end - tail.len(), end)`, gathered so that
    /// many small writes make few chunks.
    tail: BytesMut,
    // Receiving.
    received: u64,
    consumed: u64,
    ack_sent: u64,
    /// The last `Ack` may have died with a transport: acknowledge again.
    reack: bool,
    /// When the oldest consumed-but-unacknowledged byte was consumed.
    unacked_since: Option<Mono>,
}

impl Channel {
    pub fn new(mut cfg: ChannelConfig) -> Self {
        cfg.max_payload = cfg.max_payload.max(1);
        Self {
            cfg,
            acked: 0,
            sent: 0,
            max_sent: 0,
            end: 0,
            queue: VecDeque::new(),
            tail: BytesMut::new(),
            received: 0,
            consumed: 0,
            ack_sent: 0,
            reack: false,
            unacked_since: None,
        }
    }

    pub fn config(&self) -> &ChannelConfig {
        &self.cfg
    }

    /// Bytes a writer may still add before the window is full.
    pub fn space(&self) -> usize {
        let held = self.end - self.acked;
        usize::try_from(self.cfg.window.saturating_sub(held)).unwrap_or(usize::MAX)
    }

    /// Bytes held for the peer (unacknowledged, sent or not).
    pub fn buffered(&self) -> u64 {
        self.end - self.acked
    }

    /// Takes as much of `src` as the window allows; returns how much.
    pub fn write(&mut self, src: &[u8]) -> usize {
        let n = src.len().min(self.space());
        if n > 0 {
            self.tail.extend_from_slice(&src[..n]);
            self.end += n as u64;
            if self.tail.len() >= self.cfg.max_payload {
                self.seal_tail();
            }
        }
        n
    }

    /// Moves the gathered tail into the queue as one chunk. A small tail
    /// after a small chunk is merged into it (a copy of under
    /// 2 × [`SMALL_CHUNK`]): tiny writes sent one by one would otherwise
    /// make one chunk each, each costing more than its bytes and every
    /// [`Self::next_data`] scanning them. So no two small chunks are
    /// adjacent: at most `2 × window / SMALL_CHUNK + 1` chunks.
    fn seal_tail(&mut self) {
        if self.tail.is_empty() {
            return;
        }
        if self.tail.len() < SMALL_CHUNK
            && let Some(back) = self.queue.back_mut()
            && back.len() < SMALL_CHUNK
        {
            let mut merged = BytesMut::with_capacity(back.len() + self.tail.len());
            merged.extend_from_slice(back);
            merged.extend_from_slice(&self.tail);
            *back = merged.freeze();
            self.tail = BytesMut::new();
            return;
        }
        let chunk = self.tail.split().freeze();
        self.queue.push_back(chunk);
        // `split` keeps the spare capacity; an idle channel holds none.
        self.tail = BytesMut::new();
    }

    /// The next `Data` to put on the transport: `(offset, payload)`, at most
    /// `max_payload` bytes; `None` when everything buffered was sent.
    pub fn next_data(&mut self) -> Option<(u64, Bytes)> {
        if self.sent == self.end {
            return None;
        }
        self.seal_tail();
        let want = usize::try_from(self.end - self.sent)
            .unwrap_or(usize::MAX)
            .min(self.cfg.max_payload);
        // Find the chunk holding `sent`.
        let mut at = self.acked;
        let mut out: Option<BytesMut> = None;
        let mut first: Option<Bytes> = None;
        let mut got = 0usize;
        for chunk in &self.queue {
            let len = chunk.len() as u64;
            if at + len <= self.sent {
                at += len;
                continue;
            }
            let skip = usize::try_from(self.sent.max(at) - at).unwrap_or(0);
            let take = (chunk.len() - skip).min(want - got);
            let piece = chunk.slice(skip..skip + take);
            match (&mut first, &mut out) {
                (None, _) => first = Some(piece),
                (Some(f), None) => {
                    let mut b = BytesMut::with_capacity(want);
                    b.extend_from_slice(f);
                    b.extend_from_slice(&piece);
                    out = Some(b);
                }
                (Some(_), Some(b)) => b.extend_from_slice(&piece),
            }
            got += take;
            at += len;
            if got == want {
                break;
            }
        }
        let payload = match out {
            Some(b) => b.freeze(),
            None => first.unwrap_or_default(),
        };
        let seq = self.sent;
        self.sent += payload.len() as u64;
        self.max_sent = self.max_sent.max(self.sent);
        Some((seq, payload))
    }

    /// The peer consumed everything below `ack`: drop it from the buffer.
    /// (An ack past `sent` is possible after a resume from a lower offset:
    /// the peer had those bytes after all, so they need no resend.)
    pub fn on_ack(&mut self, ack: u64) -> Result<(), ChannelError> {
        if ack < self.acked || ack > self.max_sent {
            return Err(ChannelError::AckOutOfRange {
                ack,
                acked: self.acked,
                sent: self.max_sent,
            });
        }
        self.release_below(ack);
        self.sent = self.sent.max(ack);
        Ok(())
    }

    fn release_below(&mut self, offset: u64) {
        while let Some(front) = self.queue.front_mut() {
            let len = front.len() as u64;
            if self.acked + len <= offset {
                self.acked += len;
                self.queue.pop_front();
            } else {
                let cut = usize::try_from(offset - self.acked).unwrap_or(0);
                *front = front.slice(cut..);
                self.acked = offset;
                break;
            }
        }
        self.acked = self.acked.max(offset);
        if self.queue.is_empty() && self.queue.capacity() > 0 {
            // Idle sessions give their queue's memory back.
            self.queue = VecDeque::new();
        }
    }

    /// A new transport (after the RESUME exchange): the peer holds
    /// everything below `offset`; what it lacks is sent again from there.
    /// Bytes it holds but has not consumed stay buffered (and in the
    /// window) until it acknowledges them, so its receive buffer stays
    /// bounded by the window across the jump. Our own last `Ack` may have
    /// died with the old transport, so the next [`Channel::ack_due`]
    /// repeats it. Returns how many bytes go out again (they were sent on
    /// a transport before, past what the peer holds).
    pub fn resume_from(&mut self, offset: u64) -> Result<u64, ChannelError> {
        if offset < self.acked || offset > self.max_sent {
            return Err(ChannelError::ResumeOutOfRange {
                offset,
                acked: self.acked,
                sent: self.max_sent,
            });
        }
        self.sent = offset;
        self.reack = true;
        Ok(self.max_sent - offset)
    }

    /// `Data` at `seq` arrived: returns the bytes not seen before (a resend
    /// may overlap what arrived on the previous transport).
    pub fn on_data(&mut self, seq: u64, payload: Bytes) -> Result<Bytes, ChannelError> {
        let end = seq
            .checked_add(payload.len() as u64)
            .ok_or(ChannelError::Overflow)?;
        if seq > self.received {
            return Err(ChannelError::Gap {
                expected: self.received,
                got: seq,
            });
        }
        if end > self.consumed.saturating_add(self.cfg.window) {
            return Err(ChannelError::OverWindow {
                end,
                consumed: self.consumed,
                window: self.cfg.window,
            });
        }
        if end <= self.received {
            return Ok(Bytes::new());
        }
        let fresh = payload.slice(usize::try_from(self.received - seq).unwrap_or(0)..);
        self.received = end;
        Ok(fresh)
    }

    /// The application took `n` more of the received bytes.
    pub fn consume(&mut self, n: usize, now: Mono) {
        let n = n as u64;
        debug_assert!(self.consumed + n <= self.received);
        self.consumed = (self.consumed + n).min(self.received);
        if n > 0 && self.unacked_since.is_none() {
            self.unacked_since = Some(now);
        }
    }

    /// The offset to acknowledge now, if one is due: enough bytes, or the
    /// oldest unacknowledged byte waited `ack_delay`. `force` (e.g. with a
    /// Pong) acknowledges whatever is new.
    pub fn ack_due(&mut self, now: Mono, force: bool) -> Option<u64> {
        let new = self.consumed - self.ack_sent;
        if self.reack && self.consumed > 0 {
            self.reack = false;
            self.ack_sent = self.consumed;
            self.unacked_since = None;
            return Some(self.consumed);
        }
        if new == 0 {
            return None;
        }
        let late = self
            .unacked_since
            .is_some_and(|t| now.saturating_since(t) >= self.cfg.ack_delay);
        if force || late || new >= self.cfg.ack_bytes {
            self.ack_sent = self.consumed;
            self.unacked_since = None;
            return Some(self.consumed);
        }
        None
    }

    /// Whether enough bytes were consumed that [`Channel::ack_due`] would
    /// acknowledge them now (without changing anything).
    pub fn ack_due_by_bytes(&self) -> bool {
        self.consumed - self.ack_sent >= self.cfg.ack_bytes
    }

    /// When [`Channel::ack_due`] becomes due by time alone, if it will.
    pub fn ack_deadline(&self) -> Option<Mono> {
        if self.reack && self.consumed > 0 {
            return Some(Mono::ZERO);
        }
        self.unacked_since.map(|t| t + self.cfg.ack_delay)
    }

    /// The offset a RESUME / ResumeOk reports: everything that arrived.
    pub fn received(&self) -> u64 {
        self.received
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }
    pub fn acked(&self) -> u64 {
        self.acked
    }
    pub fn end(&self) -> u64 {
        self.end
    }
    pub fn consumed(&self) -> u64 {
        self.consumed
    }
}

#[cfg(test)]
mod tests;
