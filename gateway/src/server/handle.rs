//! [`GatewayHandle`]: what the admin port and harnesses see of a running
//! gateway (drain state, session counts, one session's details).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use jvpn_proto::SessionId;
use jvpn_runtime::admin::{AdminApp, AdminToken, DrainTrigger};

use super::state::Shared;
use crate::engine::Mono;

/// What the admin endpoints need from a running gateway.
#[derive(Clone)]
pub struct GatewayHandle {
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for GatewayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayHandle")
            .field("node_id", &self.shared.cfg.node_id)
            .finish()
    }
}

impl GatewayHandle {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Relaxed)
    }

    pub fn admin_token(&self) -> Option<AdminToken> {
        self.shared.admin_token.get()
    }

    pub fn drain_trigger(&self) -> &DrainTrigger {
        &self.shared.drain
    }

    /// One session as the engine holds it (operators, behind the admin
    /// token); `None` when the id is malformed or unknown. No keys.
    pub fn session_info(&self, id_hex: &str) -> Option<serde_json::Value> {
        let bytes: [u8; 16] = hex::decode(id_hex).ok()?.try_into().ok()?;
        let id = SessionId::from_bytes(bytes);
        let now = self.shared.now();
        let shard = crate::engine::shard_of(&id, self.shared.shards.len());
        self.shared.with_engine(shard, |e| {
            let s = e.session(&id)?;
            let ms = |t: Mono| t.saturating_since(now).as_millis() as u64;
            Some(serde_json::json!({
                "state": s.state().as_str(),
                "state_version": s.state_version(),
                "binding_epoch": s.binding_epoch(),
                "attached": s.transport().is_some(),
                "transport_lost_ttl_left_ms": s.transport_lost_deadline().map(ms),
                "lifetime_left_ms": ms(s.end_of_life()),
                "switches_last_60s": s.switches_in_window(now),
                "heartbeat_interval_ms": s.policy().heartbeat_interval_ms,
            }))
        })
    }

    /// Sessions per state (TERMINATED is always 0: terminated sessions are removed).
    pub fn session_counts(&self) -> Vec<(&'static str, u64)> {
        self.shared.live_counts()
    }
}

impl AdminApp for GatewayHandle {
    fn not_ready(&self) -> Option<&'static str> {
        self.is_draining().then_some("draining")
    }

    fn token(&self) -> Option<AdminToken> {
        self.admin_token()
    }

    fn drain(&self) -> &DrainTrigger {
        self.drain_trigger()
    }

    fn leave(&self) -> bool {
        if let Some(c) = &self.shared.cluster {
            c.leave();
        }
        true
    }

    fn session(&self, id: &str) -> Option<Option<serde_json::Value>> {
        Some(self.session_info(id))
    }

    fn json(&self, path: &str) -> Option<serde_json::Value> {
        (path == "/sessions").then(|| {
            let counts = self.session_counts();
            let total: u64 = counts.iter().map(|(_, v)| v).sum();
            let by_state: serde_json::Map<String, serde_json::Value> = counts
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.into()))
                .collect();
            serde_json::json!({ "total": total, "by_state": by_state })
        })
    }
}
