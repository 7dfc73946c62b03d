//! One client connection: admission, preamble, placement or owner routing,
//! PROXY v2 to the chosen gateway, then splice until either side ends or
//! the gateway stops being alive.
//!
//! Pre-TLS answers follow DESIGN §2.1: `no_gateway`, `overloaded`,
//! `bad_preamble`, `unsupported_version`, `owner_lost` (final) and
//! `owner_unreachable` (retry after the hint).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use jvpn_proto::ids::{Incarnation, NodeId};
use jvpn_proto::preamble::{PREAMBLE_LEN, Preamble, Status};
use jvpn_proto::proxy::ProxyHeader;
use jvpn_runtime::admission::SourceKey;
use jvpn_runtime::wire::send_status as status;
use metrics::{counter, histogram};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::metrics as m;
use crate::replay::TokenRefusal;
use crate::state::{Placement, ResumeRoute, RouterState};

/// Retry hint for transient refusals.
const RETRY_SOON: Duration = Duration::from_millis(250);
/// Retry hint when the owner refused a connect.
const RETRY_DYING: Duration = Duration::from_millis(100);

/// How a connection ended (the `result` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Spliced,
    ClosedOnDeath,
    NoGateway,
    OwnerLost,
    OwnerUnreachable,
    BadToken,
    BadPreamble,
    /// The client left before its preamble was whole (a load balancer's
    /// health check, a port scan): not a broken agent.
    ClosedEarly,
    PreambleTimeout,
    RateLimited,
    Overloaded,
    ConnectFailed,
}

impl Outcome {
    /// Every (kind, result) pair a client connection can be counted under:
    /// each series exists at 0 from start-up.
    pub const SERIES: [(&'static str, Outcome); 17] = [
        ("none", Outcome::Overloaded),
        ("none", Outcome::RateLimited),
        ("none", Outcome::PreambleTimeout),
        ("none", Outcome::BadPreamble),
        ("none", Outcome::ClosedEarly),
        ("hello", Outcome::NoGateway),
        ("hello", Outcome::Overloaded),
        ("hello", Outcome::ConnectFailed),
        ("hello", Outcome::Spliced),
        ("hello", Outcome::ClosedOnDeath),
        ("resume", Outcome::BadToken),
        ("resume", Outcome::OwnerLost),
        ("resume", Outcome::OwnerUnreachable),
        ("resume", Outcome::Overloaded),
        ("resume", Outcome::ConnectFailed),
        ("resume", Outcome::Spliced),
        ("resume", Outcome::ClosedOnDeath),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Spliced => "spliced",
            Outcome::ClosedOnDeath => "closed_on_member_death",
            Outcome::NoGateway => "no_gateway",
            Outcome::OwnerLost => "owner_lost",
            Outcome::OwnerUnreachable => "owner_unreachable",
            Outcome::BadToken => "bad_token",
            Outcome::BadPreamble => "bad_preamble",
            Outcome::ClosedEarly => "closed_early",
            Outcome::PreambleTimeout => "preamble_timeout",
            Outcome::RateLimited => "rate_limited",
            Outcome::Overloaded => "overloaded",
            Outcome::ConnectFailed => "connect_failed",
        }
    }
}

/// Handles one accepted client connection to the end.
pub async fn handle(state: Arc<RouterState>, mut client: TcpStream, peer: SocketAddr) {
    let _ = client.set_nodelay(true);
    let open = state.active.fetch_add(1, Ordering::Relaxed) + 1;
    let max = state.max_connections();
    let (kind, outcome) = if open > max.saturating_add(state.status_room()) {
        // So far past the cap that holding the socket while the answer is
        // read would take descriptors the rest of the router needs.
        jvpn_runtime::wire::send_status_now(client, Status::Overloaded, Duration::from_millis(500));
        ("none", Outcome::Overloaded)
    } else if open > max {
        status(&mut client, Status::Overloaded, Duration::from_millis(500)).await;
        ("none", Outcome::Overloaded)
    } else {
        match state.admit(SourceKey::from(peer.ip())) {
            Err(retry) => {
                status(&mut client, Status::Overloaded, retry).await;
                ("none", Outcome::RateLimited)
            }
            Ok(slot) => {
                let r = serve(&state, &mut client, peer).await;
                state.release(slot);
                r
            }
        }
    };
    state.active.fetch_sub(1, Ordering::Relaxed);
    debug_assert!(
        Outcome::SERIES.contains(&(kind, outcome)),
        "({kind}, {outcome:?}) has no series at 0"
    );
    counter!(m::CONNECTIONS, "kind" => kind, "result" => outcome.as_str()).increment(1);
}

async fn serve(
    state: &RouterState,
    client: &mut TcpStream,
    peer: SocketAddr,
) -> (&'static str, Outcome) {
    let t = Duration::from_millis(state.cfg.raw.timeouts.preamble_timeout_ms);
    let mut pre = [0u8; PREAMBLE_LEN];
    match tokio::time::timeout(t, client.read_exact(&mut pre)).await {
        Err(_) => return ("none", Outcome::PreambleTimeout),
        Ok(Err(_)) => return ("none", Outcome::ClosedEarly),
        Ok(Ok(_)) => {}
    }
    let preamble = match Preamble::decode(&pre) {
        Ok(p) => p,
        Err(e) => {
            status(client, e.status(), Duration::ZERO).await;
            return ("none", Outcome::BadPreamble);
        }
    };
    match preamble {
        Preamble::Hello { .. } => ("hello", hello(state, client, peer, &pre).await),
        Preamble::Resume { key_id, token } => (
            "resume",
            resume(state, client, peer, &pre, key_id, &token).await,
        ),
    }
}

async fn hello(
    state: &RouterState,
    client: &mut TcpStream,
    peer: SocketAddr,
    pre: &[u8; PREAMBLE_LEN],
) -> Outcome {
    let Some(first) = state.place_hello() else {
        status(client, Status::NoGateway, Duration::from_secs(1)).await;
        return Outcome::NoGateway;
    };
    let mut connect_failed = false;
    let mut p = first;
    for attempt in 0..2 {
        // One retry, elsewhere, chosen only when the first failed.
        if attempt == 1 {
            match state.place_retry(&p) {
                Some(next) => p = next,
                None => break,
            }
        }
        if let Err(retry) = state.gateway_budget(&p.member.node_id, false) {
            status(client, Status::Overloaded, retry).await;
            return Outcome::Overloaded;
        }
        let member = (&p.member.node_id, p.member.incarnation);
        let Some(mut gw) = connect(state, member, p.member.addr, true).await else {
            connect_failed = true;
            continue;
        };
        if !state.still_placeable(&p) {
            // It turned draining (a rolling restart begins), died or left
            // the view while we connected: the next placement. The
            // gateway reads a LOCAL header, as from a probe, and no HELLO.
            debug!(node = %p.member.node_id, "placement no longer ready once connected");
            send_local(&mut gw).await;
            continue;
        }
        let header = proxy_header(state, peer, &gw, Some(&p), None);
        if send_header(&mut gw, header, pre).await.is_err() {
            // Nothing reached the gateway: the next placement, as for a
            // failed connect.
            connect_failed = true;
            continue;
        }
        state.check_placeable(&p);
        return forward(
            state,
            client,
            &mut gw,
            &p.member.node_id,
            p.member.incarnation,
        )
        .await;
    }
    status(client, Status::NoGateway, RETRY_SOON).await;
    if connect_failed {
        Outcome::ConnectFailed
    } else {
        Outcome::NoGateway
    }
}

async fn resume(
    state: &RouterState,
    client: &mut TcpStream,
    peer: SocketAddr,
    pre: &[u8; PREAMBLE_LEN],
    key_id: u8,
    token: &[u8; jvpn_proto::token::TOKEN_LEN],
) -> Outcome {
    let (to, takeover) = match state.route_resume(key_id, token) {
        ResumeRoute::BadToken => {
            status(client, Status::BadPreamble, Duration::ZERO).await;
            return Outcome::BadToken;
        }
        ResumeRoute::Lost => {
            status(client, Status::OwnerLost, Duration::ZERO).await;
            return Outcome::OwnerLost;
        }
        ResumeRoute::Unreachable => {
            status(client, Status::OwnerUnreachable, RETRY_SOON).await;
            return Outcome::OwnerUnreachable;
        }
        ResumeRoute::Takeover {
            node,
            incarnation,
            addr,
        } => ((node, incarnation, addr), true),
        ResumeRoute::Splice {
            node,
            incarnation,
            addr,
        } => ((node, incarnation, addr), false),
    };
    splice_resume(state, client, peer, pre, token, to, takeover).await
}

/// Splices a RESUME to `to`: its owner, or for a takeover the session's
/// shard owner (PROXY TLV 0xE3 says so).
async fn splice_resume(
    state: &RouterState,
    client: &mut TcpStream,
    peer: SocketAddr,
    pre: &[u8; PREAMBLE_LEN],
    token: &[u8; jvpn_proto::token::TOKEN_LEN],
    (node, incarnation, addr): (NodeId, Incarnation, SocketAddr),
    takeover: bool,
) -> Outcome {
    if let Err(refusal) = state.token_budget(token, peer.ip()) {
        let (reason, retry) = match refusal {
            TokenRefusal::TooOften(d) => (m::TOKEN_REFUSALS[0], d),
            TokenRefusal::TableFull(d) => (m::TOKEN_REFUSALS[1], d),
        };
        counter!(m::TOKEN_SPLICES_REFUSED, "reason" => reason).increment(1);
        status(client, Status::Overloaded, retry).await;
        return Outcome::Overloaded;
    }
    if let Err(retry) = state.gateway_budget(&node, true) {
        status(client, Status::Overloaded, retry).await;
        return Outcome::Overloaded;
    }
    let Some(mut gw) = connect(state, (&node, incarnation), addr, true).await else {
        // Often a dying owner: the verdict is at most a few ticks away.
        status(client, Status::OwnerUnreachable, RETRY_DYING).await;
        return Outcome::OwnerUnreachable;
    };
    if takeover {
        counter!(m::TAKEOVERS_ROUTED).increment(1);
    }
    let intended = Resume {
        owner: (node.clone(), incarnation),
        takeover,
    };
    let header = proxy_header(state, peer, &gw, None, Some(intended));
    if send_header(&mut gw, header, pre).await.is_err() {
        status(client, Status::OwnerUnreachable, RETRY_SOON).await;
        return Outcome::ConnectFailed;
    }
    forward(state, client, &mut gw, &node, incarnation).await
}

/// What a RESUME's PROXY header says about where it is going.
struct Resume {
    /// TLV 0xE2: the incarnation the router routed to.
    owner: (NodeId, Incarnation),
    /// TLV 0xE3: that incarnation is asked to take the session over.
    takeover: bool,
}

/// Connects to a gateway for a splice (`splice`: the connect metrics
/// count it) or for a reachability probe (counted as a probe only).
async fn connect(
    state: &RouterState,
    (node, incarnation): (&NodeId, Incarnation),
    addr: SocketAddr,
    splice: bool,
) -> Option<TcpStream> {
    let t = Duration::from_millis(state.cfg.raw.timeouts.connect_timeout_ms);
    let started = Instant::now();
    let failed = || {
        if splice {
            counter!(m::CONNECT_FAILURES).increment(1);
        }
    };
    match tokio::time::timeout(t, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            if splice {
                histogram!(m::CONNECT_SECONDS).record(started.elapsed().as_secs_f64());
            }
            state.on_connect(node, incarnation, true);
            let _ = s.set_nodelay(true);
            Some(s)
        }
        Ok(Err(e)) if !says_gateway_unreachable(&e) => {
            // This router's own trouble (no file descriptors, no ephemeral
            // port, no buffers): not the gateway's, so it counts against no
            // member; every gateway would otherwise die of it at once.
            failed();
            static WARN: jvpn_runtime::wire::AtMost =
                jvpn_runtime::wire::AtMost::per(Duration::from_secs(10));
            if let Some(held) = WARN.allow() {
                warn!(error = %e, held, "cannot connect to any gateway: a local resource ran out");
            }
            None
        }
        _ => {
            failed();
            debug!(node = %node, "connect to gateway failed");
            state.on_connect(node, incarnation, false);
            None
        }
    }
}

/// A connect error that says something about the gateway or the path to
/// it (refused, unreachable, reset, timed out), not about this router.
fn says_gateway_unreachable(e: &std::io::Error) -> bool {
    !matches!(
        e.raw_os_error(),
        Some(
            nix::libc::EMFILE
                | nix::libc::ENFILE
                | nix::libc::ENOBUFS
                | nix::libc::ENOMEM
                | nix::libc::EADDRNOTAVAIL
        )
    )
}

/// Probes a member that died unreachable: a TCP connect to its client
/// address (the result goes to membership like any connect), then a PROXY
/// `LOCAL` header, which the gateway counts as a health check and closes.
pub async fn probe(
    state: Arc<RouterState>,
    node: NodeId,
    incarnation: Incarnation,
    addr: SocketAddr,
) {
    let ok = match connect(&state, (&node, incarnation), addr, false).await {
        Some(mut s) => {
            send_local(&mut s).await;
            let _ = s.shutdown().await;
            "ok"
        }
        None => "failed",
    };
    counter!(m::REACHABILITY_PROBES, "result" => ok).increment(1);
}

/// The (client, gateway) pair a PROXY v2 header carries, both of one
/// family as the format requires: IPv4-mapped addresses are written as
/// IPv4 (a router on `[::]` sees IPv4 clients mapped), and when the
/// families still differ both are written as IPv6, IPv4 mapped, so the
/// client's address is never lost.
fn proxy_addresses(client: SocketAddr, gateway: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (c, g) = (canonical(client), canonical(gateway));
    let as_v6 = |a: SocketAddr| match a.ip() {
        std::net::IpAddr::V4(v4) => SocketAddr::new(v4.to_ipv6_mapped().into(), a.port()),
        std::net::IpAddr::V6(_) => a,
    };
    if c.is_ipv4() == g.is_ipv4() {
        (c, g)
    } else {
        (as_v6(c), as_v6(g))
    }
}

fn proxy_header(
    state: &RouterState,
    peer: SocketAddr,
    gw: &TcpStream,
    placement: Option<&Placement>,
    resume: Option<Resume>,
) -> Vec<u8> {
    let dst = gw.peer_addr().unwrap_or(peer);
    let (src, dst) = proxy_addresses(peer, dst);
    let view_id = match placement {
        Some(p) => p.ring.view().id(),
        None => state.view_id(),
    };
    let h = ProxyHeader {
        addresses: Some((src, dst)),
        router_id: Some(state.cfg.router_id.to_string()),
        view_id: Some(view_id),
        takeover: resume.as_ref().is_some_and(|r| r.takeover),
        intended_owner: resume.map(|r| r.owner),
    };
    // Our own TLVs are short and valid: encoding cannot exceed the limit.
    h.encode().unwrap_or_default()
}

/// A LOCAL PROXY header and nothing after it: the gateway takes the
/// connection for a health check, not a bad client.
async fn send_local(gw: &mut TcpStream) {
    if let Ok(h) = ProxyHeader::local().encode() {
        let _ = gw.write_all(&h).await;
    }
}

/// Writes the PROXY header and the agent's preamble to the gateway.
async fn send_header(
    gw: &mut TcpStream,
    mut header: Vec<u8>,
    pre: &[u8; PREAMBLE_LEN],
) -> std::io::Result<()> {
    header.extend_from_slice(pre);
    gw.write_all(&header).await
}

/// Splices the agent and the gateway (header sent) until either ends, or
/// the gateway is declared dead.
async fn forward(
    state: &RouterState,
    client: &mut TcpStream,
    gw: &mut TcpStream,
    node: &NodeId,
    incarnation: Incarnation,
) -> Outcome {
    let mut death = state.death_signal(node, incarnation);
    let size = state.cfg.raw.splice.buffer_bytes;
    let mode = state.cfg.raw.splice.mode;
    let sc = &state.cfg.raw.splice;
    let timeouts = crate::splice::Timeouts {
        half_close: Duration::from_millis(sc.half_close_timeout_ms),
        idle: Duration::from_millis(sc.idle_timeout_ms),
        keepalive: (sc.keepalive_ms > 0).then(|| Duration::from_millis(sc.keepalive_ms)),
        agent_silence: state.agent_silence(node, incarnation),
    };
    let tally = crate::splice::Tally::default();
    let outcome = tokio::select! {
        () = crate::splice::splice_with(client, gw, size, mode, timeouts, &tally) => {
            Outcome::Spliced
        }
        _ = death.wait_for(|dead| *dead) => {
            counter!(m::CLOSED_ON_DEATH).increment(1);
            Outcome::ClosedOnDeath
        }
    };
    // Counted however the splice ended (a death drops it mid-way).
    let moved = tally.moved();
    counter!(m::SPLICED_BYTES, "direction" => "up").increment(moved.up);
    counter!(m::SPLICED_BYTES, "direction" => "down").increment(moved.down);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Issue 18 H2: a router listening on `[::]` sees IPv4 clients as
    /// `::ffff:a.b.c.d`. The PROXY header must still carry the client's
    /// address (it used to carry the gateway's, port 0, so every client
    /// shared one per-source bucket on the gateway).
    #[test]
    fn a_mapped_client_address_reaches_the_gateway_as_ipv4() {
        let (src, dst) = proxy_addresses(a("[::ffff:198.51.100.7]:40000"), a("10.0.0.9:7443"));
        assert_eq!(src, a("198.51.100.7:40000"));
        assert_eq!(dst, a("10.0.0.9:7443"));
    }

    #[test]
    fn mixed_families_are_both_written_as_ipv6_without_losing_the_client() {
        // An IPv4 client to a gateway reached over IPv6.
        let (src, dst) = proxy_addresses(a("198.51.100.7:40000"), a("[2001:db8::9]:7443"));
        assert_eq!(src, a("[::ffff:198.51.100.7]:40000"));
        assert_eq!(dst, a("[2001:db8::9]:7443"));
        assert_eq!(
            SourceKey::from(src.ip()),
            SourceKey::from(a("198.51.100.7:1").ip())
        );
        // An IPv6 client to a gateway reached over IPv4.
        let (src, dst) = proxy_addresses(a("[2001:db8::7]:40000"), a("10.0.0.9:7443"));
        assert_eq!(src, a("[2001:db8::7]:40000"));
        assert_eq!(dst, a("[::ffff:10.0.0.9]:7443"));
        // One family: unchanged.
        let same = (a("198.51.100.7:40000"), a("10.0.0.9:7443"));
        assert_eq!(proxy_addresses(same.0, same.1), same);
    }
}
