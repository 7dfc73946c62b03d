//! Bidirectional copy between an agent and its gateway.
//!
//! Each direction waits for readiness without holding a buffer, then reads
//! into a buffer of `buffer_bytes` that lives only while data is flowing: an
//! idle spliced connection costs its two sockets and a small task, not two
//! copy buffers. Reads use uninitialised capacity (`read_buf`), so a
//! large buffer costs no zeroing. Half-close is forwarded (EOF on one side
//! shuts down the write side of the other), and the other direction then
//! has `splice.half_close_timeout_ms` to finish. A splice in which no byte
//! moved either way for `splice.idle_timeout_ms` is closed too (agents ping
//! every `heartbeat_interval_ms`, so only dead peers are that quiet), and
//! both sockets send TCP keepalive probes after `splice.keepalive_ms` of
//! silence, which finds a peer that vanished without FIN or RST sooner.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use jvpn_runtime::relay::reset_on_close;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

/// How bytes move between the two sockets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `read` into a transient buffer, `write` out.
    #[default]
    Copy,
    /// `splice(2)` through a pipe created per burst: no copy to user space.
    Pipe,
}

/// Bytes moved in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    pub up: u64,
    pub down: u64,
}

/// Bytes moved so far, counted as they move: readable however the splice
/// ends, even when its future is dropped mid-way (a deadline, the owner's
/// death).
#[derive(Debug, Default)]
pub struct Tally {
    up: AtomicU64,
    down: AtomicU64,
}

impl Tally {
    pub fn moved(&self) -> Moved {
        Moved {
            up: self.up.load(Ordering::Relaxed),
            down: self.down.load(Ordering::Relaxed),
        }
    }
}

/// How long a splice may wait on its peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// After one direction reached EOF, how long the other may go on.
    pub half_close: Duration,
    /// How long no byte may move either way (checked once per period, so
    /// the splice ends between one and two periods after the last byte).
    pub idle: Duration,
    /// TCP keepalive on both sockets: probes start after this much silence
    /// (`None`: off).
    pub keepalive: Option<Duration>,
    /// How long bytes towards the agent may stay unacknowledged
    /// (`TCP_USER_TIMEOUT` on the agent's socket; `None`: the keepalive's
    /// bound). Its gateway's agents give a silent transport up after this
    /// long; so does the splice, and the gateway sees it close.
    pub agent_silence: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            half_close: Duration::from_secs(10),
            idle: Duration::from_secs(300),
            keepalive: Some(Duration::from_secs(60)),
            agent_silence: None,
        }
    }
}

/// The least unacknowledged time a splice allows its agent, whatever a
/// gateway says: below a few retransmissions, a healthy but lossy path
/// would be cut.
const MIN_AGENT_SILENCE: Duration = Duration::from_millis(500);

impl Timeouts {
    /// The agent socket's unacknowledged-data bound from `agent_silence`:
    /// at least [`MIN_AGENT_SILENCE`], and never later than the keepalive's
    /// bound (a gateway with a very long timeout must not make a vanished
    /// peer cost more than before).
    fn agent_bound(&self) -> Option<Duration> {
        let s = self.agent_silence?.max(MIN_AGENT_SILENCE);
        Some(self.keepalive.map_or(s, |k| s.min(keepalive_params(k).2)))
    }
}

/// Copies until both directions reached EOF, or one failed.
pub async fn splice(agent: &mut TcpStream, gateway: &mut TcpStream, buffer_bytes: usize) -> Moved {
    let tally = Tally::default();
    splice_with(
        agent,
        gateway,
        buffer_bytes,
        Mode::Copy,
        Timeouts::default(),
        &tally,
    )
    .await;
    tally.moved()
}

/// As [`splice`], moving bytes the way `mode` says, within `t`, counting
/// them in `tally`.
pub async fn splice_with(
    agent: &mut TcpStream,
    gateway: &mut TcpStream,
    buffer_bytes: usize,
    mode: Mode,
    t: Timeouts,
    tally: &Tally,
) {
    if let Some(k) = t.keepalive {
        keepalive(agent, k);
        keepalive(gateway, k);
    }
    if let Some(s) = t.agent_bound() {
        // A failure leaves the keepalive's bound, as before.
        let _ = socket2::SockRef::from(&*agent).set_tcp_user_timeout(Some(s));
    }
    let half_close = t.half_close;
    // The tally doubles as activity for `idle`.
    let activity = || {
        let m = tally.moved();
        m.up + m.down
    };
    // Armed until both directions ended cleanly: a splice cut for any
    // other reason (an error, a deadline, its task dropped when its gateway
    // died) resets both sockets, so that neither peer takes a cut for a
    // clean end.
    reset_on_close(agent, true);
    reset_on_close(gateway, true);
    let clean = {
        let (ar, aw) = agent.split();
        let (gr, gw) = gateway.split();
        let up = pump(ar, gw, buffer_bytes, mode, &tally.up);
        let down = pump(gr, aw, buffer_bytes, mode, &tally.down);
        // Armed when the first direction ends: a peer that never closes its
        // side must not hold both sockets for ever.
        let deadline = tokio::time::sleep(Duration::MAX);
        let idle = tokio::time::sleep(t.idle);
        let mut seen = 0u64;
        tokio::pin!(up, down, deadline, idle);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            if up_done && down_done {
                break true;
            }
            if up_done != down_done && deadline.is_elapsed() {
                break false;
            }
            let armed = up_done || down_done;
            if armed && deadline.deadline() > tokio::time::Instant::now() + half_close {
                deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + half_close);
            }
            tokio::select! {
                () = &mut deadline, if armed => break false,
                () = &mut idle => {
                    let now_seen = activity();
                    if now_seen == seen {
                        break false;
                    }
                    seen = now_seen;
                    idle.as_mut().reset(tokio::time::Instant::now() + t.idle);
                }
                r = &mut up, if !up_done => {
                    up_done = true;
                    if r.is_err() {
                        break false;
                    }
                }
                r = &mut down, if !down_done => {
                    down_done = true;
                    if r.is_err() {
                        break false;
                    }
                }
            }
        }
    };
    if clean {
        reset_on_close(agent, false);
        reset_on_close(gateway, false);
    }
}

/// Keepalive probes after `after` of silence (at least 1 s), then every
/// `after / 6` (at least 1 s), 3 unanswered probes ending the connection.
/// Linux sends no probes while data waits for acknowledgement, so
/// `TCP_USER_TIMEOUT` bounds that case with the same total: either way a
/// vanished peer is found within `after` + 3 intervals (90 s at 60 s)
/// instead of the idle timeout or ~15 min of retransmissions. A failure
/// only loses the probes, so it is ignored.
fn keepalive(s: &TcpStream, after: Duration) {
    let (time, interval, bound) = keepalive_params(after);
    let params = socket2::TcpKeepalive::new()
        .with_time(time)
        .with_interval(interval)
        .with_retries(3);
    let sock = socket2::SockRef::from(s);
    let _ = sock.set_tcp_keepalive(&params);
    let _ = sock.set_tcp_user_timeout(Some(bound));
}

/// (first probe, probe interval, give-up bound) for a keepalive `after`.
fn keepalive_params(after: Duration) -> (Duration, Duration, Duration) {
    let time = after.max(Duration::from_secs(1));
    let interval = (after / 6).max(Duration::from_secs(1));
    (time, interval, time + 3 * interval)
}

/// One direction: `Ok` on EOF, `Err` on an error. Every byte written is
/// added to `moved` as it goes.
async fn pump(
    from: ReadHalf<'_>,
    to: WriteHalf<'_>,
    size: usize,
    mode: Mode,
    moved: &AtomicU64,
) -> Result<(), ()> {
    match mode {
        Mode::Copy => pump_copy(from, to, size, moved).await,
        Mode::Pipe => pump_pipe(from, to, size, moved).await,
    }
}

async fn pump_copy(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    size: usize,
    moved: &AtomicU64,
) -> Result<(), ()> {
    loop {
        wait_readable(&from).await?;
        if copy_burst(&mut from, &mut to, size, moved).await? {
            return Ok(());
        }
    }
}

/// Waits until `from` has bytes (or EOF). Through `poll_read_ready`, not
/// `readable()`: it takes from the task's cooperative budget, so when a
/// read then says "nothing" because the budget ran out, the caller
/// yields here instead of spinning.
async fn wait_readable(from: &ReadHalf<'_>) -> Result<(), ()> {
    std::future::poll_fn(|cx| from.as_ref().poll_read_ready(cx))
        .await
        .map_err(|_| ())
}

/// Moves what `from` holds now through a buffer of `size`, dropped after
/// (idle connections hold no copy buffer). `Ok(true)`: EOF, passed on.
async fn copy_burst(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    size: usize,
    moved: &AtomicU64,
) -> Result<bool, ()> {
    let mut buf = BytesMut::with_capacity(size);
    loop {
        buf.clear();
        // `None`: no data, or the task's budget is spent (the caller's
        // wait then yields). Through `poll_read`, which takes a short
        // read as proof the socket is drained: a small message (a
        // keep-alive) costs one `recv`, not a second one that finds
        // nothing (a third of an idle router's system calls).
        match jvpn_runtime::wire::poll_once(from.read_buf(&mut buf)).await {
            None => return Ok(false),
            Some(Ok(0)) => {
                let _ = to.shutdown().await;
                return Ok(true);
            }
            Some(Ok(n)) => {
                if to.write_all(&buf).await.is_err() {
                    return Err(());
                }
                moved.fetch_add(n as u64, Ordering::Relaxed);
            }
            Some(Err(_)) => return Err(()),
        }
    }
}

fn spliced(
    from: impl std::os::fd::AsFd,
    to: impl std::os::fd::AsFd,
    len: usize,
) -> io::Result<usize> {
    use nix::fcntl::SpliceFFlags;
    nix::fcntl::splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
thread_local! {
    /// Tests: every pipe fails, as when the process is out of descriptors.
    static NO_PIPES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn make_pipe() -> nix::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use nix::fcntl::OFlag;
    #[cfg(test)]
    if NO_PIPES.get() {
        return Err(nix::errno::Errno::EMFILE);
    }
    nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)
}

/// Zero-copy direction: socket → pipe → socket with `splice(2)`. The pipe
/// exists only while data flows, like the copy buffer.
async fn pump_pipe(
    from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    chunk: usize,
    moved: &AtomicU64,
) -> Result<(), ()> {
    let mut from = from;
    loop {
        wait_readable(&from).await?;
        let Ok((pipe_r, pipe_w)) = make_pipe() else {
            // Out of descriptors for a moment: this burst goes through a
            // buffer, and the connection lives on.
            if copy_burst(&mut from, &mut to, chunk, moved).await? {
                return Ok(());
            }
            continue;
        };
        loop {
            // `try_io` takes nothing from the task's budget: without this a
            // sender as fast as the splice would keep this task running.
            tokio::task::coop::consume_budget().await;
            let src: &TcpStream = from.as_ref();
            let n = match src.try_io(Interest::READABLE, || spliced(src, &pipe_w, chunk)) {
                Ok(0) => {
                    let _ = to.shutdown().await;
                    return Ok(());
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return Err(()),
            };
            let mut left = n;
            while left > 0 {
                let dst: &TcpStream = to.as_ref();
                match dst.try_io(Interest::WRITABLE, || spliced(&pipe_r, dst, left)) {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if dst.writable().await.is_err() {
                            return Err(());
                        }
                    }
                    Err(_) => return Err(()),
                }
            }
            moved.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A copy splice with a 1 KiB buffer under `t`; resolves to what moved.
    fn spawn_splice(
        mut agent_side: TcpStream,
        mut gateway_side: TcpStream,
        t: Timeouts,
    ) -> tokio::task::JoinHandle<Moved> {
        tokio::spawn(async move {
            let tally = Tally::default();
            splice_with(
                &mut agent_side,
                &mut gateway_side,
                1024,
                Mode::Copy,
                t,
                &tally,
            )
            .await;
            tally.moved()
        })
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// Pipe mode, when no pipe can be made (the process is out of
    /// descriptors): each burst goes through a buffer instead, and the
    /// splice carries on; it used to end the connection.
    #[tokio::test]
    async fn a_pipe_splice_without_pipes_copies_instead_of_ending() {
        NO_PIPES.set(true);
        let (mut agent_end, agent_side) = pair().await;
        let (gateway_side, mut gateway_end) = pair().await;
        let task = tokio::spawn(async move {
            let (mut a, mut g) = (agent_side, gateway_side);
            let tally = Tally::default();
            splice_with(
                &mut a,
                &mut g,
                1024,
                Mode::Pipe,
                Timeouts::default(),
                &tally,
            )
            .await;
            tally.moved()
        });
        let up: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        agent_end.write_all(&up).await.unwrap();
        agent_end.shutdown().await.unwrap();
        let mut got = Vec::new();
        gateway_end.read_to_end(&mut got).await.unwrap();
        assert!(got == up, "{} bytes of {} arrived", got.len(), up.len());
        gateway_end.write_all(b"back").await.unwrap();
        gateway_end.shutdown().await.unwrap();
        let mut back = Vec::new();
        agent_end.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"back");
        let moved = task.await.unwrap();
        assert_eq!(
            moved,
            Moved {
                up: 100_000,
                down: 4
            }
        );
    }

    #[tokio::test]
    async fn copies_both_ways_forwards_half_close_and_counts_bytes() {
        // agent_end <-> agent_side [splice] gateway_side <-> gateway_end
        let (mut agent_end, mut agent_side) = pair().await;
        let (mut gateway_side, mut gateway_end) = pair().await;
        // A small buffer forces many reads per direction.
        let task = tokio::spawn(async move { splice(&mut agent_side, &mut gateway_side, 7).await });
        let up: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        agent_end.write_all(&up).await.unwrap();
        agent_end.shutdown().await.unwrap();
        let mut got = Vec::new();
        gateway_end.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got, up,
            "EOF from the agent reached the gateway after all bytes"
        );
        // The other direction still works after the half-close.
        gateway_end.write_all(b"still here").await.unwrap();
        gateway_end.shutdown().await.unwrap();
        let mut back = Vec::new();
        agent_end.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"still here");
        let moved = task.await.unwrap();
        assert_eq!(
            moved,
            Moved {
                up: 100_000,
                down: 10
            }
        );
    }

    /// Issue 18 H1: after one direction's EOF the other waited for ever, so
    /// a client that sent its preamble and went idle held two descriptors
    /// and a per-source slot after the gateway hung up. The other direction
    /// now has `half_close` to finish.
    #[tokio::test]
    async fn a_half_closed_splice_ends_within_the_half_close_deadline() {
        let (agent_end, agent_side) = pair().await;
        let (gateway_side, gateway_end) = pair().await;
        let task = spawn_splice(
            agent_side,
            gateway_side,
            Timeouts {
                half_close: Duration::from_millis(200),
                ..Timeouts::default()
            },
        );
        // The gateway hangs up; the agent stays connected and silent.
        drop(gateway_end);
        let moved = tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the splice ended after the half-close deadline")
            .unwrap();
        assert_eq!(moved, Moved::default());
        drop(agent_end);
    }

    /// Issue 18 H1: a splice whose two peers both went silent (a dead NAT
    /// mapping behind a gateway that has not noticed yet) ended never; it
    /// ends after `idle`, and traffic keeps it open.
    #[tokio::test]
    async fn a_silent_splice_ends_after_the_idle_timeout() {
        let (mut agent_end, agent_side) = pair().await;
        let (gateway_side, mut gateway_end) = pair().await;
        let t = Timeouts {
            half_close: Duration::from_secs(3600),
            idle: Duration::from_millis(300),
            keepalive: None,
            agent_silence: None,
        };
        let started = tokio::time::Instant::now();
        let task = spawn_splice(agent_side, gateway_side, t);
        // Traffic for a while: one byte every 100 ms keeps it open.
        let mut b = [0u8; 1];
        for _ in 0..10 {
            agent_end.write_all(b"x").await.unwrap();
            gateway_end.read_exact(&mut b).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!task.is_finished(), "closed while bytes moved");
        let last_byte = tokio::time::Instant::now();
        let moved = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the idle splice ended")
            .unwrap();
        // A splice ended by a deadline still reports what it moved (the
        // router's byte counters lost it before).
        assert_eq!(moved, Moved { up: 10, down: 0 });
        // Not before one whole idle period without a byte.
        assert!(last_byte.elapsed() >= t.idle, "{:?}", last_byte.elapsed());
        assert!(started.elapsed() >= Duration::from_millis(1_000));
        // Both sockets were cut: the peers see a reset, not a clean end
        // (a splice ended by the router is not a stream that ended).
        for (end, s) in [("agent", &mut agent_end), ("gateway", &mut gateway_end)] {
            let r = s.read(&mut b).await;
            assert_eq!(
                r.map_err(|e| e.kind()),
                Err(std::io::ErrorKind::ConnectionReset),
                "the {end} read a cut as a clean end"
            );
        }
    }

    #[tokio::test]
    async fn a_reset_on_one_side_ends_the_splice() {
        let (agent_end, mut agent_side) = pair().await;
        let (mut gateway_side, gateway_end) = pair().await;
        let task =
            tokio::spawn(async move { splice(&mut agent_side, &mut gateway_side, 1024).await });
        // SO_LINGER 0: close with RST (a zero linger never blocks on drop).
        #[allow(deprecated)]
        gateway_end
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(gateway_end);
        let moved = tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("splice ended")
            .unwrap();
        assert_eq!(moved, Moved::default());
        // The reset went on: the agent does not read a clean end.
        let mut agent_end = agent_end;
        let mut b = [0u8; 1];
        let r = tokio::io::AsyncReadExt::read(&mut agent_end, &mut b).await;
        assert_eq!(
            r.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset),
            "a reset reached the agent as a clean end"
        );
    }

    /// Issue 18 H1: a spliced peer that vanished without a FIN or RST (a
    /// dead NAT mapping, a powered-off phone) held both sockets until the
    /// idle timeout at best. TCP keepalive probes them after `keepalive`.
    #[tokio::test]
    async fn spliced_sockets_probe_silent_peers_with_tcp_keepalive() {
        use std::os::fd::AsFd;
        let (_agent_end, mut agent_side) = pair().await;
        let (mut gateway_side, _gateway_end) = pair().await;
        // Duplicates: the same sockets, their options read after the move.
        let fds = [
            agent_side.as_fd().try_clone_to_owned().unwrap(),
            gateway_side.as_fd().try_clone_to_owned().unwrap(),
        ];
        let task =
            tokio::spawn(async move { splice(&mut agent_side, &mut gateway_side, 1024).await });
        // The splice sets the options before it first waits.
        tokio::task::yield_now().await;
        eventually_set(|| {
            fds.iter().all(|fd| {
                let s = socket2::SockRef::from(fd);
                let after = Timeouts::default().keepalive.unwrap();
                s.keepalive().unwrap()
                    && s.tcp_keepalive_time().unwrap() == after
                    && s.tcp_user_timeout().unwrap() == Some(after + 3 * (after / 6))
            })
        })
        .await;
        assert!(!task.is_finished());
        task.abort();
    }

    /// Design note 53: the agent's socket gets the gateway's agent silence
    /// as its unacknowledged-data bound (never beyond the keepalive's, never
    /// below `MIN_AGENT_SILENCE`); the
    /// gateway's keeps the keepalive's.
    #[tokio::test]
    async fn the_agents_socket_is_given_up_after_the_agent_silence() {
        let bound = Timeouts::default()
            .keepalive
            .map(keepalive_params)
            .unwrap()
            .2;
        for (silence, want) in [
            (Duration::from_millis(2_000), Duration::from_millis(2_000)),
            (Duration::from_secs(600), bound),
            (Duration::from_millis(1), MIN_AGENT_SILENCE),
        ] {
            agent_silence_applies(silence, want).await;
        }
    }

    async fn agent_silence_applies(silence: Duration, want: Duration) {
        use std::os::fd::AsFd;
        let (_agent_end, agent_side) = pair().await;
        let (gateway_side, _gateway_end) = pair().await;
        let fds = [
            agent_side.as_fd().try_clone_to_owned().unwrap(),
            gateway_side.as_fd().try_clone_to_owned().unwrap(),
        ];
        let t = Timeouts {
            agent_silence: Some(silence),
            ..Timeouts::default()
        };
        let task = spawn_splice(agent_side, gateway_side, t);
        let after = Timeouts::default().keepalive.unwrap();
        eventually_set(|| {
            let [a, g] = &fds;
            socket2::SockRef::from(a).tcp_user_timeout().unwrap() == Some(want)
                && socket2::SockRef::from(g).tcp_user_timeout().unwrap()
                    == Some(after + 3 * (after / 6))
        })
        .await;
        task.abort();
    }

    /// Polls `ok` for up to 5 s (the splice task runs on another worker).
    async fn eventually_set(ok: impl Fn() -> bool) {
        for _ in 0..500 {
            if ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("keepalive never set on the spliced sockets");
    }
}
