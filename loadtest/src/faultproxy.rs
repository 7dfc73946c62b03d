//! A user-space TCP fault proxy (this kernel has no `tc netem`).
//!
//! Listens on loopback and forwards each connection to one upstream,
//! connecting from the client's own source IP (loopback allows any
//! 127.0.0.0/8 address) so per-source limits still see distinct clients.
//! On command it can:
//!
//! - [`FaultProxy::cut_all`]: close every current connection (both sides);
//! - [`FaultProxy::stall_all`]: stop forwarding on every current connection
//!   but keep the sockets open (a half-open transport);
//! - [`FaultProxy::set_mode`]: delay every chunk, or blackhole new
//!   connections (accepted, never forwarded);
//! - prefix every upstream connection with fixed bytes (to put a preamble in
//!   front of a foreign TLS client such as `openssl s_client`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

/// What happens to new and current connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// Every forwarded chunk waits this long.
    Delay(Duration),
    /// New connections are accepted and never forwarded.
    Blackhole,
    /// New connections are accepted and closed at once (a path that
    /// answers but leads nowhere: every connect fails fast).
    Refuse,
    /// New connections carry at most this many bytes a second each way,
    /// behind a buffer of a few MiB (a slow mobile link: the sender sees
    /// its bytes taken at once, the receiver gets them at the rate).
    Throttle(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnCtl {
    Run,
    Stall,
    Cut,
}

#[derive(Debug)]
struct Inner {
    upstream: SocketAddr,
    mode: Mutex<Mode>,
    conns: Mutex<HashMap<u64, watch::Sender<ConnCtl>>>,
    next: AtomicU64,
    prefix: Vec<u8>,
    /// When a byte last went from the upstream to a client.
    last_down: Mutex<Option<Instant>>,
    /// Bytes written towards the upstream, over every connection.
    up_bytes: AtomicU64,
}

impl Inner {
    /// `n` bytes were written on: towards the client (`down`) or upstream.
    fn moved(&self, down: bool, n: usize) {
        if down {
            *self
                .last_down
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        } else {
            self.up_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// A running proxy; stops accepting when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_all();
    }
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        Self::with_prefix(upstream, Vec::new()).await
    }

    pub async fn with_prefix(upstream: SocketAddr, prefix: Vec<u8>) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            upstream,
            mode: Mutex::new(Mode::Pass),
            conns: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            prefix,
            last_down: Mutex::new(None),
            up_bytes: AtomicU64::new(0),
        });
        let i2 = inner.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, peer)) = listener.accept().await {
                let inner = i2.clone();
                tokio::spawn(async move {
                    let _ = serve(inner, client, peer).await;
                });
            }
        });
        Ok(Self { addr, inner, task })
    }

    pub fn set_mode(&self, m: Mode) {
        *self
            .inner
            .mode
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = m;
    }

    fn broadcast(&self, c: ConnCtl) -> usize {
        let mut conns = self
            .inner
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = conns.len();
        for tx in conns.values() {
            let _ = tx.send(c);
        }
        if c == ConnCtl::Cut {
            conns.clear();
        }
        n
    }

    /// Closes every current connection; returns how many.
    pub fn cut_all(&self) -> usize {
        self.broadcast(ConnCtl::Cut)
    }

    /// Stops forwarding on every current connection, sockets left open.
    pub fn stall_all(&self) -> usize {
        self.broadcast(ConnCtl::Stall)
    }

    /// Closes each current connection with probability `fraction` (the
    /// caller's seeded RNG decides); returns how many.
    pub fn cut_fraction(&self, fraction: f64, rng: &mut impl rand::Rng) -> usize {
        let mut conns = self
            .inner
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut cut = Vec::new();
        for (id, tx) in conns.iter() {
            if rng.random_bool(fraction.clamp(0.0, 1.0)) {
                let _ = tx.send(ConnCtl::Cut);
                cut.push(*id);
            }
        }
        for id in &cut {
            conns.remove(id);
        }
        cut.len()
    }

    /// When bytes were last written to a client (what the client last
    /// heard from the upstream, give or take the loopback).
    pub fn last_forwarded_to_client(&self) -> Option<Instant> {
        *self
            .inner
            .last_down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes forwarded towards the upstream so far (all connections).
    pub fn forwarded_upstream(&self) -> u64 {
        self.inner.up_bytes.load(Ordering::Relaxed)
    }

    pub fn open_connections(&self) -> usize {
        self.inner
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

async fn serve(inner: Arc<Inner>, client: TcpStream, peer: SocketAddr) -> Result<()> {
    let mode = *inner.mode.lock().unwrap_or_else(PoisonError::into_inner);
    if mode == Mode::Refuse {
        jvpn_runtime::relay::reset(client);
        return Ok(());
    }
    let id = inner.next.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = watch::channel(ConnCtl::Run);
    inner
        .conns
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, tx);
    if mode == Mode::Blackhole {
        let mut rx = rx;
        let _keep = client;
        while rx.changed().await.is_ok() && *rx.borrow() != ConnCtl::Cut {}
        return Ok(());
    }
    let socket = if inner.upstream.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if peer.ip().is_loopback() && inner.upstream.ip().is_loopback() {
        // Keep the client's source address (not its port) towards the upstream.
        let _ = socket.bind(SocketAddr::new(peer.ip(), 0));
    }
    let mut upstream = socket.connect(inner.upstream).await?;
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    if !inner.prefix.is_empty() {
        upstream.write_all(&inner.prefix).await?;
    }
    let pace = match mode {
        Mode::Delay(d) => Pace::Delay(d),
        Mode::Throttle(rate) => Pace::Rate(rate.max(1)),
        _ => Pace::Delay(Duration::ZERO),
    };
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let a = tokio::spawn(pump(cr, uw, rx.clone(), pace, inner.clone(), false));
    let b = tokio::spawn(pump(ur, cw, rx, pace, inner.clone(), true));
    let _ = tokio::join!(a, b);
    inner
        .conns
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&id);
    Ok(())
}

/// How a connection's bytes are held back.
#[derive(Clone, Copy, Debug)]
enum Pace {
    /// Each chunk waits this long.
    Delay(Duration),
    /// Bytes a second.
    Rate(u32),
}

/// One direction; `down` (towards the client) records when it wrote, the
/// other direction how much.
async fn pump<R, W>(
    mut r: R,
    mut w: W,
    mut ctl: watch::Receiver<ConnCtl>,
    pace: Pace,
    inner: Arc<Inner>,
    down: bool,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if let Pace::Rate(rate) = pace {
        return paced(r, w, ctl, rate, inner, down).await;
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let state = *ctl.borrow();
        match state {
            ConnCtl::Cut => return,
            ConnCtl::Stall => {
                // Hold both sockets open without moving a byte until cut.
                if ctl.changed().await.is_err() {
                    // The proxy is gone: keep the sockets until the task is dropped.
                    std::future::pending::<()>().await;
                }
                continue;
            }
            ConnCtl::Run => {}
        }
        tokio::select! {
            r = r.read(&mut buf) => match r {
                Ok(0) | Err(_) => { let _ = w.shutdown().await; return; }
                Ok(n) => {
                    if let Pace::Delay(wait) = pace
                        && !wait.is_zero()
                    {
                        tokio::time::sleep(wait).await;
                    }
                    if w.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    inner.moved(down, n);
                }
            },
            c = ctl.changed() => if c.is_err() { return },
        }
    }
}

/// [`pump`] at `rate` bytes a second: read at once into a bounded queue
/// (the link's buffer), written out a tenth of a second's bytes at a time.
async fn paced<R, W>(
    mut r: R,
    mut w: W,
    mut ctl: watch::Receiver<ConnCtl>,
    rate: u32,
    inner: Arc<Inner>,
    down: bool,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // 256 reads of at most 16 KiB: up to 4 MiB in the link.
    let (tx, mut queue) = tokio::sync::mpsc::channel::<Vec<u8>>(256);
    let reading = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = r.read(&mut buf).await {
            if tx.send(buf[..n].to_vec()).await.is_err() {
                break;
            }
        }
        // `tx` goes: the writer drains what is queued, then ends.
    };
    let step = (rate as usize / 10).max(1);
    let writing = async {
        loop {
            let chunk = tokio::select! {
                c = queue.recv() => c,
                c = ctl.changed() => {
                    if c.is_err() || *ctl.borrow() != ConnCtl::Run {
                        return;
                    }
                    continue;
                }
            };
            let Some(chunk) = chunk else {
                let _ = w.shutdown().await;
                return;
            };
            for piece in chunk.chunks(step) {
                let wait = Duration::from_secs_f64(piece.len() as f64 / f64::from(rate));
                tokio::time::sleep(wait).await;
                if w.write_all(piece).await.is_err() {
                    return;
                }
                inner.moved(down, piece.len());
            }
        }
    };
    // Reading goes on beside the writing, which decides the end.
    tokio::select! {
        () = writing => {}
        () = async { reading.await; std::future::pending::<()>().await } => {}
    }
}
