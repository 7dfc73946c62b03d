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

/// A stream of a session opened, was refused, or closed.
#[derive(Debug)]
pub struct StreamEvent<'a> {
    pub at: Mono,
    pub session_id: &'a jvpn_proto::SessionId,
    /// The stream's number within its session (1, 2, …).
    pub stream: u64,
    /// `host:port` as the agent asked (written only when auditing).
    pub destination: &'a str,
    pub what: StreamWhat,
}

#[derive(Debug)]
pub enum StreamWhat {
    Opened,
    Refused {
        reason: &'static str,
    },
    Closed {
        how: &'static str,
        to_destination: u64,
        from_destination: u64,
    },
}

enum Msg {
    Line(String),
    /// Write everything queued so far, then answer.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Handle for emitting events; cheap to clone.
#[derive(Clone)]
pub struct EventSink {
    tx: Option<mpsc::Sender<Msg>>,
    /// Stream events carry their destination.
    audit: bool,
    node_id: NodeId,
    incarnation: Incarnation,
    /// The host's CLOCK_MONOTONIC at the engine clock's origin, so events
    /// carry a stamp comparable across processes (`host_mono_ns`).
    host_origin_ns: u64,
    /// A syslog collector that gets every event too.
    syslog: Option<crate::syslog::Syslog>,
    /// This boot of the host (`/proc/sys/kernel/random/boot_id`): events
    /// with the same one share `host_mono_ns`'s clock.
    boot_id: Option<std::sync::Arc<str>>,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink")
            .field("enabled", &self.tx.is_some())
            .finish()
    }
}

impl EventSink {
    /// Starts the writer task (if a path is configured). Needs a tokio runtime.
    /// `host_origin_ns`: the host's monotonic clock when the engine's
    /// clock read zero.
    pub fn start(
        cfg: &EventsConfig,
        syslog: Option<crate::syslog::Target>,
        node_id: NodeId,
        incarnation: Incarnation,
        host_origin_ns: u64,
    ) -> Self {
        let tx = (!cfg.path.is_empty()).then(|| {
            let (tx, rx) = mpsc::channel(cfg.queue_capacity);
            tokio::spawn(write_loop(cfg.path.clone(), rx));
            tx
        });
        Self {
            tx,
            audit: cfg.audit_destinations,
            node_id,
            incarnation,
            host_origin_ns,
            syslog: syslog.map(|t| crate::syslog::Syslog::start(t, cfg.queue_capacity)),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .ok()
                .map(|b| b.trim().into())
                .filter(|b: &std::sync::Arc<str>| !b.is_empty()),
        }
    }

    /// Queues one event line for the file and the collector; never waits.
    fn send(&self, kind: &str, ts_ms: u64, line: String) {
        if let Some(s) = &self.syslog {
            s.send(kind, ts_ms, &line);
        }
        if let Some(tx) = &self.tx
            && tx.try_send(Msg::Line(line)).is_err()
        {
            metrics::counter!(m::EVENTS_DROPPED).increment(1);
        }
    }

    fn enabled(&self) -> bool {
        self.tx.is_some() || self.syslog.is_some()
    }

    /// Queues one stream event; never waits. The destination is written
    /// only with `events.audit_destinations`.
    pub fn emit_stream(&self, ev: &StreamEvent<'_>) {
        if !self.enabled() {
            return;
        }
        let (kind, mut v) = match &ev.what {
            StreamWhat::Opened => ("StreamOpened", json!({ "event_type": "StreamOpened" })),
            StreamWhat::Refused { reason } => (
                "StreamRefused",
                json!({ "event_type": "StreamRefused", "reason": reason }),
            ),
            StreamWhat::Closed {
                how,
                to_destination,
                from_destination,
            } => (
                "StreamClosed",
                json!({
                    "event_type": "StreamClosed",
                    "how": how,
                    "bytes_to_destination": to_destination,
                    "bytes_from_destination": from_destination,
                }),
            ),
        };
        v["session_id"] = json!(ev.session_id.to_string());
        v["stream"] = json!(ev.stream);
        if self.audit {
            v["destination"] = json!(ev.destination);
        }
        let (ts_ms, line) = self.stamp(v, ev.at);
        self.send(kind, ts_ms, line);
    }

    /// The gateway is about to tell an agent it owns `session_id` at
    /// `owner_epoch` (`answer`: `hello_ok` or `resume_ok`), every check
    /// passed: what the agent is told, where state changes record what the
    /// engine did (a RESUME the store then refuses changes state, but is
    /// never answered).
    pub fn answered(
        &self,
        at: Mono,
        session_id: &jvpn_proto::SessionId,
        owner_epoch: u64,
        answer: &str,
    ) {
        if !self.enabled() {
            return;
        }
        let v = json!({
            "event_type": "SessionAnswered",
            "session_id": session_id.to_string(),
            "answer": answer,
            "owner_epoch": owner_epoch,
        });
        let (ts_ms, line) = self.stamp(v, at);
        self.send("SessionAnswered", ts_ms, line);
    }

    /// Queues one event; never waits.
    pub fn emit(&self, ev: &EngineEvent) {
        if !self.enabled() {
            return;
        }
        let (kind, ts_ms, line) = self.to_json(ev);
        self.send(kind, ts_ms, line);
    }

    /// Waits (at most `within`) until everything queued so far is written.
    /// The file and the syslog collector are flushed side by side.
    pub async fn flush(&self, within: std::time::Duration) {
        let syslog = async {
            if let Some(s) = &self.syslog {
                s.flush(within).await;
            }
        };
        let file = async {
            let Some(tx) = &self.tx else { return };
            let (done, wait) = tokio::sync::oneshot::channel();
            let _ = tokio::time::timeout(within, async {
                if tx.send(Msg::Flush(done)).await.is_ok() {
                    let _ = wait.await;
                }
            })
            .await;
        };
        tokio::join!(syslog, file);
    }

    fn to_json(&self, ev: &EngineEvent) -> (&'static str, u64, String) {
        let (kind, at, v) = match ev {
            EngineEvent::StateChange(c) => (
                "SessionStateChange",
                c.at,
                json!({
                    "event_type": "SessionStateChange",
                    "session_id": c.session_id.to_string(),
                    "from": c.from.as_str(),
                    "to": c.to.as_str(),
                    "state_version": c.state_version,
                    "owner_epoch": c.owner_epoch,
                    "reason_code": c.reason.as_str(),
                }),
            ),
            EngineEvent::ResumeRefused {
                at,
                session_id,
                reason,
            } => (
                "ResumeRefused",
                *at,
                json!({
                    "event_type": "ResumeRefused",
                    "session_id": session_id.to_string(),
                    "reason_code": reason.as_str(),
                }),
            ),
        };
        let (ts_ms, line) = self.stamp(v, at);
        (kind, ts_ms, line)
    }

    /// The fields every event carries: when (wall, process and host
    /// clocks) and where (node, incarnation). Returns `ts_ms` and the line.
    fn stamp(&self, mut v: serde_json::Value, at: Mono) -> (u64, String) {
        // Wall-clock time is for humans; ordering uses the monotonic stamp.
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        v["ts_ms"] = json!(ts_ms as u64);
        v["mono_ns"] = json!(Mono::as_nanos(at));
        v["host_mono_ns"] = json!(self.host_origin_ns.saturating_add(at.as_nanos()));
        if let Some(b) = &self.boot_id {
            v["host_boot_id"] = json!(&**b);
        }
        v["node_id"] = json!(self.node_id.as_str());
        v["incarnation"] = json!(self.incarnation.to_string());
        (ts_ms as u64, v.to_string())
    }
}

async fn write_loop(path: String, mut rx: mpsc::Receiver<Msg>) {
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
                tracing::warn!(error = %e, %path, "event sink cannot be opened; events will be dropped");
                while let Some(msg) = rx.recv().await {
                    if let Msg::Line(_) = msg {
                        metrics::counter!(m::EVENTS_DROPPED).increment(1);
                    }
                }
                return;
            }
        }
    };
    // Lines are batched and written at most every FLUSH_EVERY (or when 64 KiB
    // accumulate): one write per batch, not one per event.
    const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
    const BATCH_MAX: usize = 64 * 1024;
    let mut batch = String::with_capacity(BATCH_MAX);
    let mut pending = 0u64;
    let mut broken = false;
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut ack = None;
        let flush_now = tokio::select! {
            msg = rx.recv() => match msg {
                Some(Msg::Line(_)) if broken => {
                    metrics::counter!(m::EVENTS_DROPPED).increment(1);
                    false
                }
                Some(Msg::Line(line)) => {
                    batch.push_str(&line);
                    batch.push('\n');
                    pending += 1;
                    batch.len() >= BATCH_MAX
                }
                Some(Msg::Flush(done)) => {
                    ack = Some(done);
                    pending > 0
                }
                None => break,
            },
            _ = tick.tick() => pending > 0,
        };
        if flush_now {
            let written = out.write_all(batch.as_bytes()).await.and(out.flush().await);
            match written {
                Ok(()) => metrics::counter!(m::EVENTS_WRITTEN).increment(pending),
                Err(e) => {
                    tracing::warn!(error = %e, %path, "event sink broke; further events are dropped");
                    metrics::counter!(m::EVENTS_DROPPED).increment(pending);
                    broken = true;
                }
            }
            batch.clear();
            pending = 0;
        }
        if let Some(done) = ack {
            let _ = done.send(());
        }
    }
    if pending > 0 && out.write_all(batch.as_bytes()).await.is_ok() {
        metrics::counter!(m::EVENTS_WRITTEN).increment(pending);
    }
    let _ = out.flush().await;
}
