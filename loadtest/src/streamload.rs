//! Application bytes through sessions (issue 15): each stream task opens
//! a stream to a local echo destination over an agent's tunnel, sends a
//! seeded pattern, reads it back and compares, again and again until
//! stopped. What it counts is what an application would see: bytes that
//! came back exactly, bytes lost or duplicated (must stay 0), streams that
//! ended with an explicit reset (the session ended), and streams that
//! failed any other way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use jvpn_agent::streams::{StreamError, Tunnel};
use jvpn_proto::stream::Target;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::demo::{Percentiles, percentiles};

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
    /// From each forced jump to each running stream's next byte.
    pub stall_ms_per_jump: Percentiles,
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
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Per stream task: when it last read a byte (µs since `origin`);
    /// tunnel `i`'s tasks are `i * per_tunnel ..`.
    progress: Vec<Arc<AtomicU64>>,
    per_tunnel: usize,
    origin: Instant,
    counters: Arc<Counters>,
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
    pub fn start(tunnels: &[Tunnel], per_tunnel: usize, size: usize, dest: SocketAddr) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let origin = Instant::now();
        let counters = Arc::new(Counters::default());
        let mut tasks = Vec::new();
        let mut progress = Vec::new();
        let target = Target::new(&dest.ip().to_string(), dest.port()).ok();
        for (i, t) in tunnels.iter().enumerate() {
            for j in 0..per_tunnel {
                let p = Arc::new(AtomicU64::new(0));
                progress.push(p.clone());
                let seed = ((i as u64) << 32) | ((j as u64) << 16);
                tasks.push(tokio::spawn(stream_task(
                    t.clone(),
                    target.clone(),
                    size,
                    seed,
                    stop_rx.clone(),
                    p,
                    origin,
                    counters.clone(),
                )));
            }
        }
        Self {
            stop,
            tasks,
            shared: Arc::new(Shared {
                progress,
                per_tunnel,
                origin,
                counters,
                stalls: std::sync::Mutex::new(Vec::new()),
            }),
        }
    }

    /// Records, for a jump made at `at` by the agent of tunnel `tunnel`
    /// (`None`: every agent), how long until each of its streams moved a
    /// byte again (waiting at most `within`; a stream that did not move
    /// counts as `within`). Runs on its own, so probes may overlap.
    pub fn probe_stalls(
        &self,
        tunnel: Option<usize>,
        at: Instant,
        within: Duration,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let sh = self.shared.clone();
        async move {
            let since = at.duration_since(sh.origin).as_micros() as u64;
            let deadline = Instant::now() + within;
            let mut pending: Vec<usize> = match tunnel {
                Some(t) => (t * sh.per_tunnel..(t + 1) * sh.per_tunnel).collect(),
                None => (0..sh.progress.len()).collect(),
            };
            pending.retain(|i| *i < sh.progress.len());
            let mut out = Vec::new();
            loop {
                // Registered before looking, so no progress is missed.
                let moved = sh.counters.moved.notified();
                tokio::pin!(moved);
                moved.as_mut().enable();
                pending.retain(|i| {
                    let p = sh.progress[*i].load(Ordering::Relaxed);
                    if p > since {
                        out.push((p - since) / 1_000);
                        false
                    } else {
                        true
                    }
                });
                if pending.is_empty() {
                    break;
                }
                if tokio::time::timeout_at(deadline.into(), moved)
                    .await
                    .is_err()
                {
                    break;
                }
            }
            out.extend(pending.iter().map(|_| within.as_millis() as u64));
            sh.stalls
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend(out);
        }
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
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream_task(
    tunnel: Tunnel,
    target: Option<Target>,
    size: usize,
    seed: u64,
    stop: watch::Receiver<bool>,
    progress: Arc<AtomicU64>,
    origin: Instant,
    c: Arc<Counters>,
) {
    let Some(target) = target else {
        c.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut n = 0u64;
    while !*stop.borrow() {
        n += 1;
        let data = pattern(seed + n, size);
        let s = match tunnel.connect(&target).await {
            Ok(s) => s,
            // The session ended while the stream was being opened: as
            // explicit as a reset, and counted with them.
            Err(StreamError::SessionEnded(_)) => {
                c.reset.fetch_add(1, Ordering::Relaxed);
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
        let down = async {
            let mut back = Vec::with_capacity(size);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let k = r.read(&mut buf).await?;
                if k == 0 {
                    return Ok::<_, std::io::Error>(back);
                }
                back.extend_from_slice(&buf[..k]);
                progress.store(origin.elapsed().as_micros() as u64, Ordering::Relaxed);
                c.moved.notify_waiters();
            }
        };
        match tokio::try_join!(up, down) {
            Ok(((), back)) => {
                let same = back.iter().zip(&data).take_while(|(a, b)| a == b).count();
                c.bytes.fetch_add(same as u64, Ordering::Relaxed);
                c.lost.fetch_add(
                    (data.len().min(back.len()) - same) as u64,
                    Ordering::Relaxed,
                );
                c.lost.fetch_add(
                    data.len().saturating_sub(back.len()) as u64,
                    Ordering::Relaxed,
                );
                c.duplicated.fetch_add(
                    back.len().saturating_sub(data.len()) as u64,
                    Ordering::Relaxed,
                );
                c.completed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                c.reset.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
