//! The event stream: one JSON line per engine event, through a bounded queue.
//! A slow, full or broken sink drops events and counts them; it never slows
//! a session (DESIGN §7, seed §9).

use std::time::{SystemTime, UNIX_EPOCH};

use jvpn_proto::{Incarnation, NodeId};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::config::EventsConfig;
use crate::engine::{EngineEvent, Mono};
use crate::metrics as m;

/// Handle for emitting events; cheap to clone.
#[derive(Clone, Debug)]
pub struct EventSink {
    tx: Option<mpsc::Sender<String>>,
    node_id: NodeId,
    incarnation: Incarnation,
}

impl EventSink {
    /// Starts the writer task (if a path is configured). Needs a tokio runtime.
    pub fn start(cfg: &EventsConfig, node_id: NodeId, incarnation: Incarnation) -> Self {
        if cfg.path.is_empty() {
            return Self {
                tx: None,
                node_id,
                incarnation,
            };
        }
        let (tx, rx) = mpsc::channel(cfg.queue_capacity);
        tokio::spawn(write_loop(cfg.path.clone(), rx));
        Self {
            tx: Some(tx),
            node_id,
            incarnation,
        }
    }

    /// Queues one event; never waits.
    pub fn emit(&self, ev: &EngineEvent) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(self.to_json(ev)).is_err() {
            metrics::counter!(m::EVENTS_DROPPED).increment(1);
        }
    }

    fn to_json(&self, ev: &EngineEvent) -> String {
        // Wall-clock time is for humans; ordering uses the monotonic stamp.
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let (at, mut v) = match ev {
            EngineEvent::StateChange(c) => (
                c.at,
                json!({
                    "event_type": "SessionStateChange",
                    "session_id": c.session_id.to_string(),
                    "from": c.from.as_str(),
                    "to": c.to.as_str(),
                    "state_version": c.state_version,
                    "reason_code": c.reason.as_str(),
                }),
            ),
            EngineEvent::ResumeRefused {
                at,
                session_id,
                reason,
            } => (
                *at,
                json!({
                    "event_type": "ResumeRefused",
                    "session_id": session_id.to_string(),
                    "reason_code": reason.as_str(),
                }),
            ),
        };
        v["ts_ms"] = json!(ts_ms as u64);
        v["mono_ns"] = json!(Mono::as_nanos(at));
        v["node_id"] = json!(self.node_id.as_str());
        v["incarnation"] = json!(self.incarnation.to_string());
        v.to_string()
    }
}

async fn write_loop(path: String, mut rx: mpsc::Receiver<String>) {
    let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if path == "-" {
        Box::new(tokio::io::stdout())
    } else {
        // Opening a FIFO blocks until a reader appears; events queue (then drop) meanwhile.
        match tokio::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .await
        {
            Ok(f) => Box::new(f),
            Err(e) => {
                tracing::warn!(error = %e, "event sink cannot be opened; events will be dropped");
                while rx.recv().await.is_some() {
                    metrics::counter!(m::EVENTS_DROPPED).increment(1);
                }
                return;
            }
        }
    };
    let mut broken = false;
    while let Some(mut line) = rx.recv().await {
        if broken {
            metrics::counter!(m::EVENTS_DROPPED).increment(1);
            continue;
        }
        line.push('\n');
        match out.write_all(line.as_bytes()).await {
            Ok(()) => {
                metrics::counter!(m::EVENTS_WRITTEN).increment(1);
                // tokio's File buffers: flush whenever the queue runs dry.
                if rx.is_empty() && out.flush().await.is_err() {
                    broken = true;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "event sink broke; further events are dropped");
                metrics::counter!(m::EVENTS_DROPPED).increment(1);
                broken = true;
            }
        }
    }
    let _ = out.flush().await;
}
