//! Application bytes through sessions (issue 15): each stream task opens
//! a stream to a local echo destination through its agent's SOCKS5 front
//! door (as an application would; the agent's own listener, serving the
//! agent's tunnel), sends a
//! seeded pattern, reads it back and compares, again and again until
//! stopped. What it counts is what an application would see: bytes that
//! came back exactly, bytes lost or duplicated (must stay 0), streams that
//! ended with an explicit reset (the session ended), and streams that
//! failed any other way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use jvpn_agent::streams::Tunnel;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::demo::{Percentiles, percentiles};
use crate::socks::SocksError;

/// A destination on loopback that echoes every byte until EOF.
pub async fn echo_destination() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = c.set_nodelay(true);
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// The egress rule a gateway needs for [`echo_destination`] (loopback is
/// protected unless a rule names it).
pub const LOOPBACK_EGRESS: &str =
    "[[egress.rules]]\naction = \"allow\"\ncidrs = [\"127.0.0.0/8\", \"::1/128\"]\n";

/// Serves `tunnel`'s SOCKS5 / HTTP CONNECT front door on a fresh
/// 127.0.0.1 port, as `jvpn-agent connect --socks` does; the port and the
/// serving task (abort it to stop). Needs a tokio runtime.
pub fn front_door(tunnel: &Tunnel) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    l.set_nonblocking(true)?;
    let l = TcpListener::from_std(l)?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(jvpn_agent::frontdoor::serve::serve_proxy(l, tunnel.clone()));
    Ok((addr, task))
}

/// What the streams saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StreamStats {
    /// Bytes that went up and came back exactly.
    pub stream_bytes: u64,
    /// Bytes an application never got back although its stream ended
    /// cleanly, or got back wrong (must be 0).
    pub stream_bytes_lost: u64,
    /// Bytes an application got more than it sent (must be 0).
    pub stream_bytes_duplicated: u64,
    pub streams_completed: u64,
    /// Streams ended by a reset because their session ended (explicit),
    /// with those being opened at that moment.
    pub streams_reset_explicitly: u64,
    /// Streams that could not be opened or ended any other way.
    pub streams_failed: u64,
    /// Per forced jump and running stream: the longest time without an
    /// arrival (a byte, or the stream's end) in the [`STALL_WINDOW`] after it.
    pub stall_ms_per_jump: Percentiles,
    /// `streams_reset_explicitly` by tunnel, in the order of the tunnels
    /// given to [`StreamLoad::start`]: a caller that knows which sessions
    /// ended can check that only their streams were reset.
    #[serde(skip)]
    pub resets_by_tunnel: Vec<u64>,
}

#[derive(Debug, Default)]
struct Counters {
    bytes: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    completed: AtomicU64,
    reset: AtomicU64,
    failed: AtomicU64,
    /// Woken whenever a stream reads bytes.
    moved: tokio::sync::Notify,
}

/// Streams running until [`StreamLoad::stop`].
#[derive(Debug)]
pub struct StreamLoad {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Each tunnel's SOCKS5 front door.
    doors: Vec<tokio::task::JoinHandle<()>>,
    shared: Arc<Shared>,
}

/// One stream task's progress.
#[derive(Debug, Default)]
struct Progress {
    /// When it last read a byte (µs since `origin`).
    last: AtomicU64,
    /// In a transfer (from opening its stream to the last byte back);
    /// otherwise the task is doing the tool's own work, which no jump
    /// can stall.
    active: AtomicBool,
    /// Transfers started (a probe stops watching when this changes).
    transfers: AtomicU64,
    /// (transfer, µs since `origin`) of the last transfers that ended
    /// (several: after a reset, refused opens can end more in a row before
    /// a probe looks): an end (the last byte, EOF or reset) is an arrival a
    /// stall ends at.
    ended: std::sync::Mutex<std::collections::VecDeque<(u64, u64)>>,
}

impl Progress {
    /// The current transfer ended (or never got going); whether one was
    /// under way.
    fn end(&self, origin: Instant) -> bool {
        let was = self.active.swap(false, Ordering::Relaxed);
        if was {
            let t = self.transfers.load(Ordering::Relaxed);
            let mut ended = self
                .ended
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if ended.len() == 16 {
                ended.pop_front();
            }
            ended.push_back((t, origin.elapsed().as_micros() as u64));
        }
        was
    }

    /// When transfer `t` ended, if it did and that is still known.
    fn ended_at(&self, t: u64) -> Option<u64> {
        self.ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|(which, _)| *which == t)
            .map(|(_, at)| *at)
    }
}

/// How long after a jump a stream's arrivals are watched for its longest
/// gap: far beyond a resume (milliseconds on loopback), short of the
/// next jump in the load tool's scenarios.
pub const STALL_WINDOW: Duration = Duration::from_millis(500);

#[derive(Debug)]
struct Shared {
    /// Per stream task (tunnel `i`'s tasks are `i * per_tunnel ..`).
    progress: Vec<Arc<Progress>>,
    per_tunnel: usize,
    origin: Instant,
    counters: Arc<Counters>,
    /// Streams reset, per tunnel.
    resets: Vec<Arc<AtomicU64>>,
    stalls: std::sync::Mutex<Vec<u64>>,
}

/// `len` bytes from a seeded generator: each transfer's own, comparable.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill(&mut v[..]);
    v
}

impl StreamLoad {
    /// `per_tunnel` stream tasks on each tunnel, each moving `size`-byte
    /// transfers to `dest` back to back.
    pub fn start(
        tunnels: &[Tunnel],
        per_tunnel: usize,
        size: usize,
        dest: SocketAddr,
    ) -> Result<Self> {
        let (stop, stop_rx) = watch::channel(false);
        let origin = Instant::now();
        let counters = Arc::new(Counters::default());
        let resets: Vec<Arc<AtomicU64>> = tunnels.iter().map(|_| Arc::default()).collect();
        let mut tasks = Vec::new();
        let mut doors = Vec::new();
        let mut progress = Vec::new();
        for (i, t) in tunnels.iter().enumerate() {
            let (door, task) = front_door(t)?;
            doors.push(task);
            for j in 0..per_tunnel {
                let p = Arc::new(Progress::default());
                progress.push(p.clone());
                let seed = ((i as u64) << 32) | ((j as u64) << 16);
                tasks.push(tokio::spawn(stream_task(
                    door,
                    dest,
                    size,
                    seed,
                    stop_rx.clone(),
                    p,
                    origin,
                    counters.clone(),
                    resets[i].clone(),
                )));
            }
        }
        Ok(Self {
            stop,
            tasks,
            doors,
            shared: Arc::new(Shared {
                progress,
                per_tunnel,
                origin,
                counters,
                resets,
                stalls: std::sync::Mutex::new(Vec::new()),
            }),
        })
    }

    /// Records, for a jump made at `at` by the agent of tunnel `tunnel`
    /// (`None`: every agent), the longest time each of its streams that
    /// was in a transfer went without a byte arriving, from the jump to
    /// [`STALL_WINDOW`] after it. The longest gap, not the time to the next
    /// byte: bytes already buffered (HTTP/2's window, the sockets) keep
    /// arriving for a moment after a transport is gone, and the stall
    /// shows only after them. A stream that got nothing in the window is
    /// waited for up to `within` (a stream that never moves counts as
    /// `within`). Gaps are read whenever any stream moves, so a late look
    /// can only make a gap longer, never hide one. A stream whose transfer
    /// ends in the window is measured up to its end (what follows is the
    /// tool's own work), the end itself included: a stream that moved
    /// nothing after the jump and then ended stalled until that end. Runs
    /// on its own, so probes may overlap.
    pub fn probe_stalls(
        &self,
        tunnel: Option<usize>,
        at: Instant,
        within: Duration,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        probe(self.shared.clone(), tunnel, at, within)
    }

    /// Completed transfers so far.
    pub fn completed(&self) -> u64 {
        self.shared.counters.completed.load(Ordering::Relaxed)
    }

    /// Stops after each stream's current transfer and returns the counts.
    pub async fn stop(self) -> StreamStats {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        for d in self.doors {
            d.abort();
        }
        let c = &self.shared.counters;
        let stalls = std::mem::take(
            &mut *self
                .shared
                .stalls
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        StreamStats {
            stream_bytes: c.bytes.load(Ordering::Relaxed),
            stream_bytes_lost: c.lost.load(Ordering::Relaxed),
            stream_bytes_duplicated: c.duplicated.load(Ordering::Relaxed),
            streams_completed: c.completed.load(Ordering::Relaxed),
            streams_reset_explicitly: c.reset.load(Ordering::Relaxed),
            streams_failed: c.failed.load(Ordering::Relaxed),
            stall_ms_per_jump: percentiles(stalls),
            resets_by_tunnel: self
                .shared
                .resets
                .iter()
                .map(|r| r.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// SOCKS5's reply code for "network unreachable" (RFC 1928 §6).
const NETWORK_UNREACHABLE: u8 = 3;

/// [`StreamLoad::probe_stalls`], on the shared progress.
async fn probe(sh: Arc<Shared>, tunnel: Option<usize>, at: Instant, within: Duration) {
    let since = at.duration_since(sh.origin).as_micros() as u64;
    let window_end = at + STALL_WINDOW.min(within);
    let give_up = at + within;
    let picked: Vec<usize> = match tunnel {
        Some(t) => (t * sh.per_tunnel..(t + 1) * sh.per_tunnel).collect(),
        None => (0..sh.progress.len()).collect(),
    };
    // Per watched stream: its index, the transfer it is in, the
    // last arrival seen (the jump to start with), the longest gap.
    let mut watched: Vec<(usize, u64, u64, u64)> = picked
        .into_iter()
        .filter_map(|i| {
            let p = sh.progress.get(i)?;
            p.active
                .load(Ordering::Relaxed)
                .then(|| (i, p.transfers.load(Ordering::Relaxed), since, 0))
        })
        .collect();
    let mut out = Vec::new();
    loop {
        // Registered before looking, so no arrival is missed.
        let moved = sh.counters.moved.notified();
        tokio::pin!(moved);
        moved.as_mut().enable();
        let now = Instant::now();
        let now_us = now.duration_since(sh.origin).as_micros() as u64;
        watched.retain_mut(|(i, transfer, prev, gap)| {
            let p = &sh.progress[*i];
            let last = p.last.load(Ordering::Relaxed);
            let same_transfer = p.transfers.load(Ordering::Relaxed) == *transfer
                && p.active.load(Ordering::Relaxed);
            if same_transfer && last > *prev {
                *gap = (*gap).max(last - *prev);
                *prev = last;
            }
            let moved_since_jump = *prev > since;
            let done = if !same_transfer {
                // Ended (or a new transfer began): measured up to its
                // end; an end no longer known counts at this look (a
                // late look only lengthens a gap).
                let end = p.ended_at(*transfer).unwrap_or(now_us);
                *gap = (*gap).max(end.saturating_sub(*prev));
                true
            } else if now >= window_end && moved_since_jump {
                // The gap still open at the window's end counts too.
                *gap = (*gap).max(now_us.saturating_sub(*prev));
                true
            } else {
                now >= give_up
            };
            if done {
                let g = if moved_since_jump || !same_transfer {
                    *gap
                } else {
                    within.as_micros() as u64
                };
                out.push(g / 1_000);
            }
            !done
        });
        if watched.is_empty() {
            break;
        }
        let wake = if Instant::now() < window_end {
            window_end
        } else {
            give_up
        };
        let _ = tokio::time::timeout_at(wake.into(), moved).await;
    }
    sh.stalls
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .extend(out);
}

#[allow(clippy::too_many_arguments)]
async fn stream_task(
    door: SocketAddr,
    dest: SocketAddr,
    size: usize,
    seed: u64,
    stop: watch::Receiver<bool>,
    progress: Arc<Progress>,
    origin: Instant,
    c: Arc<Counters>,
    tunnel_resets: Arc<AtomicU64>,
) {
    // The next transfer's bytes are made while this one runs, and arriving
    // bytes are checked as they come, so the tool's own work seldom sits
    // between two transfers; when it does, the stream is marked inactive
    // and a jump's stall probe leaves it out.
    let make = |n: u64| tokio::task::spawn_blocking(move || Arc::new(pattern(seed + n, size)));
    let mut n = 1u64;
    let mut next = make(n);
    while !*stop.borrow() {
        if progress.end(origin) {
            // An end is an arrival too: a stall probe looks now.
            c.moved.notify_waiters();
        }
        let Ok(data) = next.await else {
            c.failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        n += 1;
        next = make(n);
        progress.transfers.fetch_add(1, Ordering::Relaxed);
        progress
            .last
            .store(origin.elapsed().as_micros() as u64, Ordering::Relaxed);
        progress.active.store(true, Ordering::Relaxed);
        let s = match crate::socks::connect(door, dest).await {
            Ok(s) => s,
            // No session to carry the stream (it ended while the stream
            // was being opened; the front door answers "network
            // unreachable"): as explicit as a reset, and counted with them.
            Err(SocksError::Refused(NETWORK_UNREACHABLE)) => {
                c.reset.fetch_add(1, Ordering::Relaxed);
                tunnel_resets.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(_) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let (mut r, mut w) = tokio::io::split(s);
        let up = {
            let data = data.clone();
            async move {
                w.write_all(&data).await?;
                w.shutdown().await
            }
        };
        // Kept outside the read so that a transfer ended by a reset is
        // checked too: what arrived before the reset must be exact.
        let check = std::sync::Mutex::new(Check::default());
        let down = async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let k = r.read(&mut buf).await?;
                if k == 0 {
                    return Ok::<_, std::io::Error>(());
                }
                check
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .arrived(&data, &buf[..k]);
                progress
                    .last
                    .store(origin.elapsed().as_micros() as u64, Ordering::Relaxed);
                c.moved.notify_waiters();
            }
        };
        let r = tokio::try_join!(up, down);
        if progress.end(origin) {
            c.moved.notify_waiters();
        }
        let check = check
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match r {
            Ok(((), ())) => {
                let (same, lost, duplicated) = check.verdict(data.len());
                c.bytes.fetch_add(same, Ordering::Relaxed);
                c.lost.fetch_add(lost, Ordering::Relaxed);
                c.duplicated.fetch_add(duplicated, Ordering::Relaxed);
                c.completed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                // The rest never came, explicitly; what came must be exact.
                let (_, wrong, duplicated) = check.verdict_before_reset(data.len());
                c.lost.fetch_add(wrong, Ordering::Relaxed);
                c.duplicated.fetch_add(duplicated, Ordering::Relaxed);
                c.reset.fetch_add(1, Ordering::Relaxed);
                tunnel_resets.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A transfer's returned bytes, compared with what was sent as they
/// arrive.
#[derive(Debug, Default)]
struct Check {
    /// Bytes received.
    got: usize,
    /// Offset of the first byte that differs from what was sent.
    first_bad: Option<usize>,
}

impl Check {
    fn arrived(&mut self, sent: &[u8], chunk: &[u8]) {
        if self.first_bad.is_none() {
            let expect = sent.get(self.got..).unwrap_or_default();
            let same = chunk.iter().zip(expect).take_while(|(a, b)| a == b).count();
            if same < chunk.len() {
                self.first_bad = Some(self.got + same);
            }
        }
        self.got += chunk.len();
    }

    /// (bytes back exactly, bytes lost, bytes duplicated) for a transfer of
    /// `len` bytes: exact up to the first difference; from there to the
    /// shorter end, and any shortfall, lost; anything past `len`,
    /// duplicated.
    fn verdict(&self, len: usize) -> (u64, u64, u64) {
        let both = len.min(self.got);
        let same = self.first_bad.unwrap_or(both).min(both);
        let lost = (both - same) + len.saturating_sub(self.got);
        let duplicated = self.got.saturating_sub(len);
        (same as u64, lost as u64, duplicated as u64)
    }

    /// [`Check::verdict`] for a transfer a reset cut short: the bytes not
    /// received are no loss (the application was told), but any that
    /// arrived wrong, from the first difference on, are; and any past
    /// `len` are duplicated.
    fn verdict_before_reset(&self, len: usize) -> (u64, u64, u64) {
        let got = self.got.min(len);
        let same = self.first_bad.unwrap_or(got).min(got);
        (
            same as u64,
            (got - same) as u64,
            self.got.saturating_sub(len) as u64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{Arc, Check, Counters, Duration, Instant, Ordering, Progress, Shared, probe};

    /// A stream that moves nothing after a jump and then ends stalled from
    /// the jump to its end; it used to be recorded as 0 ms.
    #[tokio::test]
    async fn a_stream_that_ends_without_moving_stalled_until_its_end() {
        let origin = Instant::now();
        let p = Arc::new(Progress::default());
        p.transfers.store(1, Ordering::Relaxed);
        p.active.store(true, Ordering::Relaxed);
        let sh = Arc::new(Shared {
            progress: vec![p.clone()],
            per_tunnel: 1,
            origin,
            counters: Arc::new(Counters::default()),
            resets: Vec::new(),
            stalls: std::sync::Mutex::new(Vec::new()),
        });
        let jump = Instant::now();
        let watch = tokio::spawn(probe(sh.clone(), None, jump, Duration::from_secs(5)));
        // The stall itself: nothing arrives for 150 ms, then the end.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(p.end(origin));
        sh.counters.moved.notify_waiters();
        watch.await.unwrap();
        let stalls = sh.stalls.lock().unwrap().clone();
        assert_eq!(stalls.len(), 1);
        assert!(
            (150..5_000).contains(&stalls[0]),
            "recorded {} ms for a 150 ms stall",
            stalls[0]
        );
    }

    fn check(sent: &[u8], back: &[&[u8]]) -> (u64, u64, u64) {
        let mut c = Check::default();
        for chunk in back {
            c.arrived(sent, chunk);
        }
        c.verdict(sent.len())
    }

    #[test]
    fn exact_short_long_and_corrupt_transfers_are_told_apart() {
        let sent = b"abcdefgh";
        assert_eq!(check(sent, &[b"abc", b"defgh"]), (8, 0, 0));
        assert_eq!(check(sent, &[b"abc"]), (3, 5, 0));
        assert_eq!(check(sent, &[b"abcdefgh", b"gh"]), (8, 0, 2));
        // A byte changed at offset 4: the rest counts as lost.
        assert_eq!(check(sent, &[b"abcd", b"Xfgh"]), (4, 4, 0));
        // A repeat inside the stream is a difference too.
        assert_eq!(check(sent, &[b"abcd", b"cdefgh"]), (4, 4, 2));
        assert_eq!(check(sent, &[]), (0, 8, 0));
    }

    /// A transfer a reset cut short: what did not come is no loss, what
    /// came wrong is (it used to be thrown away with the transfer).
    #[test]
    fn a_reset_transfer_is_judged_on_what_arrived() {
        let sent = b"abcdefgh";
        let cut = |back: &[&[u8]]| {
            let mut c = Check::default();
            for chunk in back {
                c.arrived(sent, chunk);
            }
            c.verdict_before_reset(sent.len())
        };
        assert_eq!(cut(&[b"abc"]), (3, 0, 0));
        assert_eq!(cut(&[]), (0, 0, 0));
        assert_eq!(cut(&[b"abX"]), (2, 1, 0));
        assert_eq!(cut(&[b"abcd", b"cd"]), (4, 2, 0));
        assert_eq!(cut(&[b"abcdefgh", b"h"]), (8, 0, 1));
    }
}
