//! The networked router: client listener, gRPC membership server, the 50 ms
//! membership ticker and the admin port, until shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use jvpn_proto::ViewId;
use jvpn_proto::pb::membership::membership_server::MembershipServer;
use jvpn_runtime::admin::AdminApp;
use jvpn_runtime::wire::lock;
use metrics::histogram;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tracing::info;

use crate::config::Validated;
use crate::metrics as m;
use crate::state::RouterState;

/// Ticker period of the membership rules (DESIGN §4).
pub const TICK: Duration = Duration::from_millis(50);

/// What the admin port shows of a router.
#[derive(Clone, Debug)]
pub struct RouterHandle {
    pub state: Arc<RouterState>,
    pub drain: jvpn_runtime::admin::DrainTrigger,
    pub digest: Arc<DigestCache>,
}

/// `/ring/digest` is a million ring lookups (≈ 0.1–0.3 s of one core) and
/// anyone who reaches the admin port may ask for it: it is computed at most
/// once per view, and a request that arrives while it is being computed
/// gets the previous answer (with its own `view_id`) instead of a second
/// computation on another runtime worker (issue 18 M4).
#[derive(Debug, Default)]
pub struct DigestCache {
    last: std::sync::Mutex<Option<(ViewId, serde_json::Value)>>,
    computing: std::sync::atomic::AtomicBool,
    computed: std::sync::atomic::AtomicU64,
}

impl DigestCache {
    /// The digest of `view`, from the cache or from `compute`.
    pub fn get(
        &self,
        view: ViewId,
        compute: impl FnOnce() -> serde_json::Value,
    ) -> serde_json::Value {
        let cached = lock(&self.last).clone();
        match cached {
            Some((v, d)) if v == view => return d,
            Some((_, d)) if self.computing.swap(true, Ordering::AcqRel) => return d,
            None if self.computing.swap(true, Ordering::AcqRel) => {
                return serde_json::json!({ "view_id": hex::encode(view.0), "computing": true });
            }
            _ => {}
        }
        let d = compute();
        self.computed.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last) = Some((view, d.clone()));
        self.computing.store(false, Ordering::Release);
        d
    }

    /// How many times a digest was computed.
    pub fn computed(&self) -> u64 {
        self.computed.load(Ordering::Relaxed)
    }
}

impl AdminApp for RouterHandle {
    fn not_ready(&self) -> Option<&'static str> {
        if self.state.is_draining() {
            Some("draining")
        } else if self.state.is_unhealthy() {
            Some("unhealthy")
        } else {
            None
        }
    }

    fn token(&self) -> Option<jvpn_runtime::admin::AdminToken> {
        self.state.admin_token.get()
    }

    fn drain(&self) -> &jvpn_runtime::admin::DrainTrigger {
        &self.drain
    }

    fn state_metrics(&self) -> String {
        self.state.member_gauges()
    }

    fn forget_member(
        &self,
        node_id: &str,
    ) -> Option<Result<serde_json::Value, jvpn_runtime::admin::MemberRefused>> {
        use crate::membership::NotForgotten;
        use jvpn_runtime::admin::MemberRefused;
        let forgotten = jvpn_proto::NodeId::new(node_id)
            .map_err(|_| NotForgotten::Unknown)
            .and_then(|node| self.state.forget(&node));
        Some(match forgotten {
            Ok(inc) => Ok(serde_json::json!({
                "forgotten": node_id,
                "incarnation": format!("{:016x}", inc.0),
            })),
            Err(NotForgotten::Unknown) => Err(MemberRefused::Unknown),
            Err(e) => Err(MemberRefused::Conflict(e.to_string())),
        })
    }

    fn json(&self, path: &str) -> Option<serde_json::Value> {
        match path {
            "/ring" => Some(ring_json(&self.state)),
            "/ring/digest" => Some(self.digest.get(self.state.view_id(), || {
                placement_digest(&self.state, DIGEST_KEYS)
            })),
            _ => None,
        }
    }
}

/// `/ring`: the view id, ring members and every known member's state.
pub fn ring_json(state: &RouterState) -> serde_json::Value {
    let view = state.view();
    let ring = state.ring();
    let members: Vec<serde_json::Value> = state
        .status()
        .into_iter()
        .map(|s| {
            let vnodes = view
                .member(&s.node_id)
                .filter(|m| m.incarnation == s.incarnation)
                .map_or(0, |m| m.weight * view.params().vnodes_per_weight);
            serde_json::json!({
                "node_id": s.node_id.as_str(),
                "incarnation": format!("{:016x}", s.incarnation.0),
                "addr": s.addr.to_string(),
                "weight": s.weight,
                "alive": s.alive,
                "placeable": s.placeable,
                "hello_ready": s.hello_ready,
                "vnodes": vnodes,
            })
        })
        .collect();
    serde_json::json!({
        "router_id": state.cfg.router_id.as_str(),
        "view_id": hex::encode(view.id().0),
        "ring_members": view.members().len(),
        "vnodes": ring.map_or(0, |r| r.vnodes()),
        "vnodes_per_weight": view.params().vnodes_per_weight,
        "ring_changes": state.ring_changes(),
        "unhealthy": state.is_unhealthy(),
        "members": members,
    })
}

/// Keys hashed by `/ring/digest`.
pub const DIGEST_KEYS: u32 = 1_000_000;

/// `/ring/digest`: the owners of `n` fixed pseudo-random keys under the
/// current ring, hashed, plus per-member counts. Two routers that agree on
/// placement report the same digest (operators compare routers with it).
pub fn placement_digest(state: &RouterState, n: u32) -> serde_json::Value {
    let Some(ring) = state.ring() else {
        return serde_json::json!({ "view_id": hex::encode(state.view_id().0), "keys": 0 });
    };
    let mut digest = blake3::Hasher::new();
    let mut counts = vec![0u64; ring.view().members().len()];
    for i in 0..n {
        let h = blake3::hash(&i.to_be_bytes());
        let mut key = [0u8; 16];
        key.copy_from_slice(&h.as_bytes()[..16]);
        if let Some(idx) = ring.owner_index(&jvpn_proto::SessionId::from_bytes(key)) {
            counts[idx] += 1;
            digest.update(&(idx as u32).to_be_bytes());
        }
    }
    let per_member: serde_json::Map<String, serde_json::Value> = ring
        .view()
        .members()
        .iter()
        .zip(counts)
        .map(|(m, c)| (m.node_id.to_string(), c.into()))
        .collect();
    serde_json::json!({
        "view_id": hex::encode(ring.view().id().0),
        "keys": n,
        "digest": digest.finalize().to_hex().to_string(),
        "per_member": per_member,
    })
}

/// Listeners bound by the caller (ports may be 0 in tests).
#[derive(Debug)]
pub struct Listeners {
    pub client: TcpListener,
    pub membership: TcpListener,
    pub admin: TcpListener,
}

/// A SIGHUP's configuration: `[admission]` applies, anything else changed
/// (or a file that does not validate) refuses the whole reload.
/// Why a SIGHUP reload was refused (the running configuration stays).
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    /// The file no longer validates.
    #[error("{0}")]
    Config(#[from] jvpn_runtime::config::ConfigErrors),
    /// Keys that only a restart may change differ.
    #[error("{} cannot change without a restart", .0.join(", "))]
    RestartOnly(Vec<&'static str>),
}

fn reload(state: &RouterState, path: &std::path::Path) -> Result<(), ReloadError> {
    let new = crate::config::load(path)?;
    let mut fixed = crate::config::restart_only_changes(&state.cfg.raw, &new.raw);
    if fixed.is_empty() {
        fixed = crate::config::restart_only_files(&state.cfg, &new);
    }
    if !fixed.is_empty() {
        return Err(ReloadError::RestartOnly(fixed));
    }
    state.reconfigure_admission(&new.raw.admission);
    state.admin_token.set(new.admin_token);
    Ok(())
}

/// A gateway's TLS handshake on the membership port must finish within this.
pub const MEMBERSHIP_TLS_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the router could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The membership port's TLS identity or CA was refused.
    #[error("membership TLS: {0}")]
    MembershipTls(#[from] tonic::transport::Error),
}

/// Runs until `shutdown` resolves, then stops accepting and gives spliced
/// connections up to `drain_timeout_ms` to finish.
pub async fn serve(
    cfg: Validated,
    listeners: Listeners,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let state = RouterState::new(cfg);
    let bound: Vec<_> = [&listeners.client, &listeners.membership, &listeners.admin]
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    state.set_listeners(&bound);
    let (stop_tx, stop_rx) = watch::channel(false);

    tokio::spawn(ticker(state.clone(), stop_rx.clone()));
    let builder = tokio::spawn(state.clone().build_views());
    let drain = jvpn_runtime::admin::DrainTrigger::default();
    tokio::spawn(jvpn_runtime::admin::serve(
        listeners.admin,
        RouterHandle {
            state: state.clone(),
            drain: drain.clone(),
            digest: Arc::default(),
        },
        prometheus,
    ));
    let shutdown = async move { drain.or(shutdown).await };
    if let Some(path) = state.cfg.source.clone() {
        let target = state.clone();
        tokio::spawn(jvpn_runtime::process::reload_on_hangup(
            path,
            move |p| reload(&target, p),
            [
                crate::metrics::CONFIG_RELOADS,
                crate::metrics::CONFIG_RELOAD_FAILURES,
            ],
        ));
    }

    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            &state.cfg.cert_pem,
            state.cfg.key_pem.as_slice(),
        ))
        .client_ca_root(Certificate::from_pem(&state.cfg.ca_pem))
        // Without it a connection that never finishes its handshake is held
        // for ever (slowloris on the membership port).
        .timeout(MEMBERSHIP_TLS_TIMEOUT);
    let svc = MembershipServer::new(crate::service::Service {
        state: state.clone(),
    });
    let mut grpc_stop = stop_rx.clone();
    let incoming =
        crate::membership_port::incoming(listeners.membership, state.clone(), stop_rx.clone());
    let grpc = Server::builder()
        .tls_config(tls)?
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = grpc_stop.wait_for(|s| *s).await;
        });
    let grpc_task = tokio::spawn(grpc);

    let mut accept_stop = stop_rx.clone();
    let acc_state = state.clone();
    let client = listeners.client;
    let accept_task = tokio::spawn(async move {
        while let Some((stream, peer)) =
            jvpn_runtime::wire::accept_until(&client, &mut accept_stop).await
        {
            tokio::spawn(crate::forward::handle(acc_state.clone(), stream, peer));
        }
    });
    info!(router = %state.cfg.router_id, "router serving");
    shutdown.await;

    info!("router stopping");
    state.set_draining();
    let drain = Duration::from_millis(state.cfg.raw.timeouts.drain_timeout_ms);
    let _ = stop_tx.send(true);
    let _ = accept_task.await;
    let deadline = Instant::now() + drain;
    while state.active.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    grpc_task.abort();
    builder.abort();
    info!("router stopped");
    Ok(())
}

async fn ticker(state: Arc<RouterState>, mut stop: watch::Receiver<bool>) {
    let mut iv = tokio::time::interval(TICK);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    loop {
        let early = state.next_early_tick();
        let at = tokio::time::Instant::from_std(early.unwrap_or_else(Instant::now));
        let regular = tokio::select! {
            // A regular tick that is due serves the early one too.
            biased;
            _ = stop.changed() => return,
            _ = iv.tick() => true,
            _ = tokio::time::sleep_until(at), if early.is_some() => false,
            _ = state.early_tick_added() => continue,
        };
        let now = Instant::now();
        if regular {
            let late = now.duration_since(last).saturating_sub(TICK);
            histogram!(m::TICK_LATENESS).record(late.as_secs_f64());
            last = now;
        }
        state.tick();
        state.early_ticks_served(now);
        histogram!(m::TICK_SECONDS).record(now.elapsed().as_secs_f64());
        for (node, incarnation, addr) in state.probes_due() {
            tokio::spawn(crate::forward::probe(
                state.clone(),
                node,
                incarnation,
                addr,
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 18 M4: a thousand requests for one view compute the digest
    /// once; a new view computes it again; a request during a computation
    /// gets the previous answer instead of starting another.
    #[test]
    fn the_digest_is_computed_once_per_view() {
        let cache = DigestCache::default();
        let (v1, v2) = (ViewId([1; 8]), ViewId([2; 8]));
        for _ in 0..1_000 {
            let d = cache.get(v1, || serde_json::json!({ "digest": "one" }));
            assert_eq!(d["digest"], "one");
        }
        assert_eq!(cache.computed(), 1);
        assert_eq!(
            cache.get(v2, || serde_json::json!({ "digest": "two" }))["digest"],
            "two"
        );
        assert_eq!(cache.computed(), 2);
        // Someone else is computing: no second computation.
        cache.computing.store(true, Ordering::Release);
        let d = cache.get(ViewId([3; 8]), || panic!("computed twice at once"));
        assert_eq!(d["digest"], "two");
        assert_eq!(cache.computed(), 2);
    }
}
