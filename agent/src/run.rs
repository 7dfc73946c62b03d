//! The keep-alive loop: one session kept alive across transport losses.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use jvpn_proto::ReasonCode;
use jvpn_proto::pb::session::{Terminate, frame::Kind};
use rand::Rng;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::{Agent, AgentError, Fresh, Transport};
use jvpn_proto::SessionId;
use jvpn_runtime::channel_io::Wakeups;

/// What the caller can ask of a running session.
#[derive(Debug)]
pub enum Command {
    /// Drop the current transport and reattach over a new connection.
    Jump,
    /// Stall: keep the transport open but stop reading and pinging, then
    /// reattach over a new connection (a half-open transport).
    StallAndJump,
    /// Send a payload and report the echo round trip.
    Echo(Vec<u8>, oneshot::Sender<Result<Duration, String>>),
    /// End the session (`Terminate{agent_closed}`).
    Close,
}

/// Counters of one agent, for summaries. No session ids in here.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AgentReport {
    pub sessions_established: u64,
    /// New HELLOs after a session was lost, explicit and counted.
    pub rehandshakes: u64,
    pub rehandshake_reasons: BTreeMap<String, u64>,
    /// Streams reset because their session ended, by the session's reason
    /// (e.g. `owner_lost`): explicit ends, each counted.
    pub streams_reset: BTreeMap<String, u64>,
    pub resumes_ok: u64,
    /// Of those, the ones whose TLS resumed from a ticket (no certificates
    /// exchanged).
    pub resumes_tls_resumed: u64,
    pub resumes_rejected: BTreeMap<String, u64>,
    /// Security or protocol checks that failed.
    pub protocol_violations: u64,
    /// `ResumeOk` answers from another owner than the session's (refused).
    pub silent_migration_attempts: u64,
    /// Topology 3: sessions carried on by a taker after their owner died
    /// (higher owner epoch, proven with the session key): explicit, counted.
    pub explicit_migrations: u64,
    pub go_aways: u64,
    /// Keep-alive pings sent. A tick finds none needed while frames went
    /// both ways within the interval (data and acks prove the path).
    pub pings_sent: u64,
    /// Transport loss → attached again, per recovery (a resume, or a
    /// re-handshake when the session was gone); the latest
    /// [`RECOVERY_SAMPLES`], as are the two below.
    pub recovery_ms: Vec<u64>,
    /// The part of `recovery_ms` that came back by explicit re-handshake
    /// (the rest resumed).
    pub rehandshake_recovery_ms: Vec<u64>,
    /// Duration of each successful RESUME attempt (connect → `ResumeOk`).
    pub resume_ms: Vec<u64>,
    /// Figures ever added to `recovery_ms`, `rehandshake_recovery_ms` and
    /// `resume_ms` (where each ring writes next).
    #[serde(skip)]
    pub samples_seen: [u64; 3],
    /// Why the session finally ended, if it did.
    pub ended: Option<String>,
    /// The gateway that owns the current session (a node name, not a secret).
    pub node_id: String,
    pub binding_epoch: u64,
    /// When the current session was established (HELLO completed).
    #[serde(skip)]
    pub established_at: Option<Instant>,
    /// When the current transport was attached (HELLO or RESUME).
    #[serde(skip)]
    pub attached_at: Option<Instant>,
    /// What happened when (`established`, `attached`, `transport_lost`),
    /// the first [`TIMELINE_MAX`] entries, for reports of sample sessions.
    #[serde(skip)]
    pub timeline: Vec<(Instant, &'static str)>,
}

/// Timeline entries kept per agent.
pub const TIMELINE_MAX: usize = 64;
/// Recovery figures kept per kind (the latest; percentiles are of those).
pub const RECOVERY_SAMPLES: usize = 65_536;

/// Adds a figure to `v`, which keeps the latest [`RECOVERY_SAMPLES`] as a
/// ring; `seen` counts the figures ever added (where the next one goes).
fn sample(v: &mut Vec<u64>, seen: &mut u64, x: u64) {
    if v.len() < RECOVERY_SAMPLES {
        v.push(x);
    } else {
        let at = usize::try_from(*seen % RECOVERY_SAMPLES as u64).unwrap_or(0);
        v[at] = x;
    }
    *seen += 1;
}

fn mark(report: &Mutex<AgentReport>, what: &'static str) {
    update(report, |r| {
        if r.timeline.len() < TIMELINE_MAX {
            r.timeline.push((Instant::now(), what));
        }
    });
}

fn record_attach(report: &Mutex<AgentReport>, agent: &Agent, hello: bool) {
    if let Some(s) = agent.session.as_ref() {
        update(report, |r| {
            r.node_id = s.node_id.clone();
            r.binding_epoch = s.binding_epoch;
            r.attached_at = Some(Instant::now());
            if hello {
                r.established_at = Some(Instant::now());
            }
        });
    }
    mark(report, if hello { "established" } else { "attached" });
}

/// A state line for humans (`jvpn-agent connect` prints these).
pub type Transitions = mpsc::UnboundedSender<String>;

fn note(tx: &Option<Transitions>, line: String) {
    if let Some(tx) = tx {
        let _ = tx.send(line);
    }
}

/// Applies `f` to the shared report.
fn update(report: &Mutex<AgentReport>, f: impl FnOnce(&mut AgentReport)) {
    f(&mut report.lock().unwrap_or_else(PoisonError::into_inner));
}

fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
    *map.entry(key.to_owned()).or_insert(0) += 1;
}

/// The session ended under its streams: every open one is reset with
/// `why`, counted by reason and said once (no identifiers).
fn end_streams(
    agent: &mut Agent,
    transitions: &Option<Transitions>,
    report: &Mutex<AgentReport>,
    why: &str,
) {
    let open = agent.open_streams();
    agent.end_streams(why);
    counted_resets(transitions, report, open, why);
}

/// `open` streams were reset, `why`: said and counted.
fn counted_resets(
    transitions: &Option<Transitions>,
    report: &Mutex<AgentReport>,
    open: u64,
    why: &str,
) {
    if open > 0 {
        note(transitions, format!("{open} open streams reset: {why}"));
        update(report, |r| {
            *r.streams_reset.entry(why.to_owned()).or_insert(0) += open
        });
    }
}

fn reason_str(e: &AgentError) -> String {
    match e {
        AgentError::Rejected { reason, .. } | AgentError::Terminated(reason) => reason.to_string(),
        AgentError::Status(s) => s.status.reason().to_string(),
        AgentError::Protocol(_) => "protocol_violation".into(),
        AgentError::OwnerMismatch { .. } => "owner_mismatch".into(),
        AgentError::ChannelBroken(_) => "channel_broken".into(),
        AgentError::Connect(..) => "connect_failed".into(),
        AgentError::Tls(_) => "tls_failed".into(),
        AgentError::NoAnswer(_) => "no_answer".into(),
        _ => "transport_dead".into(),
    }
}

/// Runs one session until `Close`, the command channel closing, or a
/// failure with no way back. Returns the final report.
pub async fn keep_alive(
    mut agent: Agent,
    cmds: mpsc::Receiver<Command>,
    transitions: Option<Transitions>,
    report: Arc<Mutex<AgentReport>>,
) -> AgentReport {
    let snapshot = || {
        report
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    };
    // This loop reads every frame: it can let the gateway keep the
    // transport alive and only check in (design note 52).
    agent.set_listens_for_keepalives(true);
    let t = match establish(&mut agent, &transitions, None, Persist::Limited).await {
        Ok(t) => t,
        Err(e) => {
            update(&report, |r| r.ended = Some(reason_str(&e)));
            return snapshot();
        }
    };
    update(&report, |r| r.sessions_established += 1);
    record_attach(&report, &agent, true);
    // Sessions a hand-over left on a draining gateway run beside this one
    // until their streams end; they stop with it.
    let (drains, mut drain_rx) = mpsc::unbounded_channel::<Draining>();
    let drainer = {
        let (transitions, report) = (transitions.clone(), report.clone());
        tokio::spawn(async move {
            let mut set = tokio::task::JoinSet::new();
            while let Some(d) = drain_rx.recv().await {
                let role = Role::Draining { until: d.until };
                set.spawn(drive(
                    d.agent,
                    d.t,
                    d.stop,
                    role,
                    transitions.clone(),
                    report.clone(),
                ));
                while set.try_join_next().is_some() {}
            }
            while set.join_next().await.is_some() {}
        })
    };
    let role = Role::Main {
        drains,
        stops: Vec::new(),
    };
    drive(agent, t, cmds, role, transitions, report.clone()).await;
    let _ = drainer.await;
    snapshot()
}

/// A session a GoAway hand-over left behind, with its transport.
struct Draining {
    agent: Agent,
    t: Transport,
    /// Closed when the agent stops.
    stop: mpsc::Receiver<Command>,
    until: Instant,
}

/// What a keep-alive loop is for.
enum Role {
    /// The agent's session: commands, re-handshakes, GoAway hand-overs
    /// (sent to `drains`; each stops when its `stops` sender drops).
    Main {
        drains: mpsc::UnboundedSender<Draining>,
        stops: Vec<mpsc::Sender<Command>>,
    },
    /// A session on a draining gateway that still carries streams: kept
    /// (across transport losses too) until they end or `until`, then
    /// ended; never re-handshaken.
    Draining { until: Instant },
}

/// A session a background HELLO made, for a GoAway hand-over.
type HandOver = oneshot::Receiver<Result<(Transport, Fresh, Agent), AgentError>>;

/// One session's loop: keeps its transport alive, carries its channel,
/// reattaches on loss.
async fn drive(
    mut agent: Agent,
    mut t: Transport,
    mut cmds: mpsc::Receiver<Command>,
    mut role: Role,
    transitions: Option<Transitions>,
    report: Arc<Mutex<AgentReport>>,
) {
    let main = matches!(role, Role::Main { .. });
    // Silence for heartbeat_timeout means the transport is dead even if TCP
    // has not noticed (a paused gateway, a blackholed path): reattach.
    let mut last_rx = Instant::now();
    // When a frame last went out: with `last_rx`, traffic both ways within
    // the interval makes a ping redundant (the gateway times its silence
    // from any frame, as the agent does).
    let mut last_tx = Instant::now();
    // The data plane's outgoing side: which channel we are subscribed to,
    // and whether frames are known to be waiting.
    let mut subscribed: Option<u64> = None;
    let mut wake: Option<Wakeups> = None;
    let mut more = false;
    let mut out = bytes::BytesMut::new();
    // A GoAway with streams open: when to move at the latest.
    let mut drain_until: Option<Instant> = match role {
        Role::Draining { until } => Some(until),
        Role::Main { .. } => None,
    };
    // The last GoAway's deadline, kept for the session a later hand-over
    // leaves behind when the first one failed (`drain_until` is cleared
    // for the retry, but the old session must still get to deliver).
    let mut goaway_until: Option<Instant> = None;
    // The next session a GoAway asked for, while it is being made, and the
    // session it is to replace.
    let mut handover: Option<(HandOver, Option<SessionId>, AbortOnDrop)> = None;
    let mut next_tick = Instant::now();
    let mut echoing: Option<Echoing> = None;
    loop {
        // Bytes of a frame still arriving prove the path too (a large frame
        // on a slow link takes longer than the silence limit).
        last_rx = last_rx.max(t.heard());
        if let Some((d, _)) = agent.data.as_ref() {
            let epoch = d.epoch.load(std::sync::atomic::Ordering::Acquire);
            if subscribed != Some(epoch) {
                subscribed = Some(epoch);
                wake = d.channel.as_ref().map(|(ch, _)| ch.wakeups());
                more = true;
            }
        }
        let ack_at = agent
            .data
            .as_ref()
            .and_then(|(d, _)| d.channel.as_ref())
            .and_then(|(ch, _)| ch.ack_at());
        let policy = agent.session.as_ref().map(|s| s.policy);
        let interval =
            Duration::from_millis(policy.map_or(500, |p| p.heartbeat_interval_ms.max(50)));
        let silence_limit =
            Duration::from_millis(policy.map_or(2_000, |p| p.heartbeat_timeout_ms.max(100)));
        // The gateway's keep-alives stand in for pongs only if two fit in
        // the silence limit (a taker's policy may differ from the one this
        // agent was told); otherwise it pings, and gets answers.
        let keepalive = t.gateway_keepalive().filter(|k| *k * 2 <= silence_limit);
        enum Ev {
            Frame(Result<Kind, AgentError>),
            Tick,
            /// Nothing heard for `heartbeat_timeout`.
            Silent,
            /// The silence deadline passed, but bytes of a frame came.
            Heard,
            Cmd(Option<Command>),
            /// The channel may have frames to send.
            Out,
            /// The hand-over's HELLO finished.
            HandedOver(Box<Result<(Transport, Fresh, Agent), AgentError>>),
        }
        // Unbiased: with frames both to send and to read, both happen.
        let ev = tokio::select! {
            f = t.recv() => Ev::Frame(f),
            () = tokio::time::sleep_until(next_tick.into()) => Ev::Tick,
            // Its own deadline, not the next tick's: with pings every
            // `interval`, a check on the tick gave up as late as
            // `heartbeat_timeout + interval` after the last frame.
            () = tokio::time::sleep_until((last_rx + silence_limit).into()) => Ev::Silent,
            c = cmds.recv() => Ev::Cmd(c),
            () = async {
                if !more {
                    match wake.as_mut() {
                        Some(w) => w.changed().await,
                        None => std::future::pending().await,
                    }
                }
            } => Ev::Out,
            () = async {
                match ack_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => Ev::Out,
            r = async {
                match handover.as_mut() {
                    Some((rx, _, _)) => rx.await.unwrap_or(Err(AgentError::NoSession)),
                    None => std::future::pending().await,
                }
            } => Ev::HandedOver(Box::new(r)),
        };
        // A deadline that passed while the loop was busy in another arm:
        // a frame that arrived meanwhile proves the path alive. (`recv`
        // keeps what it read in the transport's buffer, so a read left
        // unfinished loses nothing, as in every `select!`.)
        let ev = match ev {
            Ev::Silent => match jvpn_runtime::wire::poll_once(t.recv()).await {
                Some(f) => Ev::Frame(f),
                // Part of a frame came meanwhile: the deadline moves.
                None if t.heard().elapsed() < silence_limit => Ev::Heard,
                None => Ev::Silent,
            },
            ev => ev,
        };
        if matches!(ev, Ev::Frame(Ok(_))) {
            last_rx = Instant::now();
        }
        if matches!(ev, Ev::Tick) {
            // A steady ticker: arriving frames must not keep postponing it
            // (pings, the silence check and the drain deadline ride on it).
            next_tick = Instant::now() + interval;
        }
        let lost: Option<AgentError> = match ev {
            Ev::Silent => {
                note(&transitions, "no frame within heartbeat_timeout".into());
                Some(AgentError::Closed)
            }
            Ev::Heard => None,
            Ev::Frame(Ok(Kind::GoAway(_))) if !main => None,
            Ev::Frame(Ok(Kind::GoAway(g))) => {
                note(
                    &transitions,
                    format!("go_away: gateway draining, deadline {} ms", g.deadline_ms),
                );
                // Open streams go on until the deadline (or until they end)
                // on this session; new ones wait for the next session, made
                // now beside it, while this loop keeps serving this one.
                let open = agent.open_streams();
                if open > 0 {
                    note(
                        &transitions,
                        format!("go_away: {open} open streams stay until the deadline"),
                    );
                }
                drain_until = Some(Instant::now() + Duration::from_millis(g.deadline_ms));
                goaway_until = drain_until;
                if handover.is_none() {
                    handover = Some(hand_over(&mut agent, &transitions, true));
                }
                // Counted once new streams are held: whoever sees the count
                // and opens a stream gets the next session.
                update(&report, |r| r.go_aways += 1);
                None
            }
            Ev::HandedOver(r) => {
                let Some((_, replacing, _)) = handover.take() else {
                    continue;
                };
                let still = agent.session.as_ref().map(|s| s.id) == replacing;
                match (*r, &mut role) {
                    (Ok((new_t, fresh, fork)), Role::Main { drains, stops }) if still => {
                        let old = agent.split_off();
                        agent.take_tickets_of(&fork);
                        agent.adopt(fresh);
                        let old_t = std::mem::replace(&mut t, new_t);
                        last_rx = Instant::now();
                        let (stop, stop_rx) = mpsc::channel(1);
                        stops.retain(|s| !s.is_closed());
                        stops.push(stop);
                        let until = drain_until
                            .take()
                            .or(goaway_until.take())
                            .unwrap_or_else(Instant::now);
                        let _ = drains.send(Draining {
                            agent: old,
                            t: old_t,
                            stop: stop_rx,
                            until,
                        });
                        update(&report, |r| {
                            r.rehandshakes += 1;
                            bump(&mut r.rehandshake_reasons, "go_away");
                        });
                        record_attach(&report, &agent, true);
                        note(
                            &transitions,
                            "go_away: new streams go over the new session".into(),
                        );
                    }
                    (Ok((mut new_t, _, _)), _) => {
                        // The session it was to replace is gone already.
                        let _ =
                            tokio::time::timeout(silence_limit, new_t.send(agent_closed())).await;
                    }
                    (Err(e), _) => {
                        if let Some((d, _)) = agent.data.as_mut() {
                            d.release_new_streams();
                        }
                        note(
                            &transitions,
                            format!(
                                "no new session yet ({}); staying until the deadline",
                                reason_str(&e)
                            ),
                        );
                    }
                }
                None
            }
            Ev::Tick
                if drain_until.is_some_and(|d| {
                    handover.is_none() && (agent.open_streams() == 0 || Instant::now() >= d)
                }) =>
            {
                if !main {
                    // The streams that were left have ended, or the
                    // gateway's deadline has come. Ended streams' last
                    // bytes may still be on their way (in HTTP/2, in the
                    // channel): the session ends once the gateway has
                    // every one, which it then delivers (ended at once, it
                    // reset the streams still delivering).
                    let early = drain_until.is_some_and(|d| Instant::now() < d);
                    // An older gateway would take HTTP/2's goodbye for a
                    // broken channel, and resets at the end anyway.
                    let finishes = agent.session.as_ref().is_some_and(|s| s.channel_finish);
                    if early
                        && finishes
                        && agent.channel_broken().is_none()
                        && !agent.streams_delivered()
                    {
                        agent.let_streams_finish();
                        None
                    } else {
                        end_streams(&mut agent, &transitions, &report, "go_away_deadline");
                        let _ = tokio::time::timeout(silence_limit, t.send(agent_closed())).await;
                        return;
                    }
                } else {
                    // No next session yet (the first try failed): one more
                    // try, in the background like the first, now that this
                    // session is idle or past its deadline (if it fails
                    // too, the draining gateway ends the session and the
                    // agent makes the next one then). It holds no new
                    // streams back (a next session may be far off): they
                    // use this session until it is handed over, and then
                    // leave with it at once.
                    drain_until = None;
                    handover = Some(hand_over(&mut agent, &transitions, false));
                    None
                }
            }
            Ev::Tick if agent.channel_broken().is_some() => {
                // The session's HTTP/2 connection ended under it: its
                // streams cannot go on; a new session, explicitly.
                let why = agent.channel_broken().unwrap_or_default();
                Some(AgentError::ChannelBroken(why))
            }
            Ev::Tick if last_tx.elapsed() < interval && last_rx.elapsed() < interval => None,
            // The gateway sends keep-alives on this transport: its frames
            // prove the path (the silence deadline above), and a ping is
            // only a check-in, so that the gateway hears from this agent
            // now and then (it retires a transport silent for 30 × its
            // keep-alive interval).
            Ev::Tick
                if keepalive
                    .is_some_and(|k| last_tx.elapsed() < k * jvpn_proto::KEEPALIVE_CHECK_IN) =>
            {
                None
            }
            // Bounded by the silence deadline: a ping stuck behind a full
            // send buffer on a blackholed path must not outlast it.
            Ev::Tick => {
                let ping = async {
                    if keepalive.is_some() {
                        t.check_in().await
                    } else {
                        t.ping().await
                    }
                };
                let sent = tokio::time::timeout_at((last_rx + silence_limit).into(), ping)
                    .await
                    .unwrap_or(Err(AgentError::Closed));
                if sent.is_ok() {
                    last_tx = Instant::now();
                    update(&report, |r| r.pings_sent += 1);
                }
                sent.err()
            }
            Ev::Out => {
                more = agent
                    .data
                    .as_ref()
                    .is_some_and(|(d, _)| d.outgoing(&mut out));
                // A write that cannot finish within the silence limit means
                // the path is gone (blackholed): reattach instead of waiting
                // for TCP to give up.
                let sent = if out.is_empty() {
                    Ok(())
                } else {
                    // Until the silence limit counted from the last frame,
                    // as for a ping (a write that blocks late in a quiet
                    // spell must not stretch detection to twice the
                    // limit), but never less than half the limit: frames
                    // that arrived meanwhile wait unread behind the write.
                    let by = (last_rx + silence_limit).max(Instant::now() + silence_limit / 2);
                    tokio::time::timeout_at(by.into(), t.send_raw(&out))
                        .await
                        .unwrap_or(Err(AgentError::Closed))
                };
                if sent.is_ok() && !out.is_empty() {
                    last_tx = Instant::now();
                }
                out.clear();
                sent.err()
            }
            // Without a channel, `Data` frames are echoes.
            Ev::Frame(Ok(Kind::Data(d))) if agent.data.is_none() => {
                match echoing.take_if(|e| e.seq == d.seq) {
                    Some(e) if d.payload.as_ref() == e.payload.as_slice() => {
                        let _ = e.reply.send(Ok(e.start.elapsed()));
                        None
                    }
                    Some(e) => {
                        let _ = e.reply.send(Err("echo payload differs".into()));
                        Some(AgentError::Protocol("echo payload differs".into()))
                    }
                    None => None,
                }
            }
            Ev::Frame(Ok(k @ (Kind::Data(_) | Kind::Ack(_)))) => {
                match agent.data.as_ref().and_then(|(d, _)| d.on_frame(k).err()) {
                    None => None,
                    Some(e) => {
                        // The gateway broke the channel's rules: the session
                        // cannot go on. Say so, so that the gateway ends it
                        // now rather than after transport_lost_ttl.
                        update(&report, |r| r.protocol_violations += 1);
                        let end = Kind::Terminate(Terminate {
                            reason: ReasonCode::ProtocolError as i32,
                        });
                        let _ = tokio::time::timeout(silence_limit, t.send(end)).await;
                        Some(AgentError::ChannelBroken(format!("protocol error: {e}")))
                    }
                }
            }
            Ev::Frame(Ok(_)) => None,
            Ev::Frame(Err(e)) => Some(e),
            Ev::Cmd(None) | Ev::Cmd(Some(Command::Close)) => {
                let _ = tokio::time::timeout(silence_limit, t.send(agent_closed())).await;
                if main {
                    update(&report, |r| r.ended = Some("agent_closed".into()));
                }
                return;
            }
            Ev::Cmd(Some(Command::Echo(_, reply))) if agent.data.is_some() => {
                // The echo service is for sessions without a channel.
                let _ = reply.send(Err("echo needs a session without streams".into()));
                None
            }
            Ev::Cmd(Some(Command::Echo(_, reply))) if echoing.is_some() => {
                let _ = reply.send(Err("an echo is under way".into()));
                None
            }
            // The reply is read by this loop like any frame: silence ends
            // the transport as always, and a GoAway or a Terminate that
            // comes first is not lost.
            Ev::Cmd(Some(Command::Echo(payload, reply))) => {
                let start = Instant::now();
                let sent = tokio::time::timeout_at(
                    (last_rx + silence_limit).into(),
                    t.send_echo(&payload),
                )
                .await
                .unwrap_or(Err(AgentError::Closed));
                match sent {
                    Ok(seq) => {
                        last_tx = Instant::now();
                        echoing = Some(Echoing {
                            seq,
                            payload,
                            start,
                            reply,
                        });
                        None
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                        Some(e)
                    }
                }
            }
            Ev::Cmd(Some(Command::Jump)) => {
                note(&transitions, "jump: dropping transport".into());
                Some(AgentError::Closed)
            }
            Ev::Cmd(Some(Command::StallAndJump)) => {
                note(&transitions, "jump: old transport left half-open".into());
                // Keep `t` alive (unread) until the new one is attached.
                let lost_at = Instant::now();
                let was = owner_of(&agent);
                let persist = if main {
                    Persist::UntilStopped(&mut cmds)
                } else {
                    Persist::Limited
                };
                let lost = Loss {
                    at: lost_at,
                    said: None,
                };
                match reattach(&mut agent, &transitions, &report, lost, main, persist).await {
                    Ok(new_t) => {
                        if main && owner_of(&agent) != was {
                            // Re-handshaken (or taken over) inside: a
                            // GoAway's deadline and hand-over were the old
                            // session's or the old owner's. (A draining
                            // session keeps its deadline: it still ends.)
                            drain_until = None;
                            goaway_until = None;
                            handover = None;
                        }
                        last_rx = Instant::now();
                        let old = std::mem::replace(&mut t, new_t);
                        drop(old);
                        continue;
                    }
                    Err(e) => {
                        update(&report, |r| r.ended = Some(reason_str(&e)));
                        return;
                    }
                }
            }
        };
        let Some(e) = lost else { continue };
        if let Some(echo) = echoing.take() {
            // Its reply, if any, would come on the transport being left.
            let _ = echo.reply.send(Err(e.to_string()));
        }
        // Close the lost transport before anything else: the gateway then
        // sees a loss and takes the RESUME as a recovery, not as a switch
        // away from a live transport (design note 30).
        drop(t);
        if let AgentError::Protocol(_) = e {
            update(&report, |r| r.protocol_violations += 1);
        }
        note(&transitions, format!("transport lost: {}", reason_str(&e)));
        if main {
            mark(&report, "transport_lost");
        }
        let lost_at = Instant::now();
        if e.session_gone() {
            // The session's streams end here, explicitly, with its reason.
            end_streams(&mut agent, &transitions, &report, &reason_str(&e));
            if !main {
                return;
            }
            // A GoAway's deadline and hand-over were the gone session's:
            // the next one must not be moved by them, and its own GoAway
            // must start a hand-over of its own.
            drain_until = None;
            goaway_until = None;
            handover = None;
            let persist = Persist::UntilStopped(&mut cmds);
            match establish(&mut agent, &transitions, Some(reason_str(&e)), persist).await {
                Ok(new_t) => {
                    rehandshaken(&report, lost_at, &reason_str(&e));
                    record_attach(&report, &agent, true);
                    last_rx = Instant::now();
                    t = new_t;
                    continue;
                }
                Err(e2) => {
                    update(&report, |r| r.ended = Some(reason_str(&e2)));
                    return;
                }
            }
        }
        let was = owner_of(&agent);
        let lost = Loss {
            at: lost_at,
            said: match e {
                AgentError::Terminated(r) => Some(r),
                _ => None,
            },
        };
        let attached = match role {
            Role::Main { .. } => {
                let persist = Persist::UntilStopped(&mut cmds);
                reattach(&mut agent, &transitions, &report, lost, true, persist).await
            }
            // A draining session stops reattaching when the agent stops or
            // its deadline comes.
            Role::Draining { until } => tokio::select! {
                r = reattach(&mut agent, &transitions, &report, lost, false, Persist::Limited) => r,
                _ = cmds.recv() => Err(AgentError::Closed),
                () = tokio::time::sleep_until(until.into()) => Err(AgentError::Closed),
            },
        };
        match attached {
            Ok(new_t) => {
                if main && owner_of(&agent) != was {
                    // The RESUME found the session gone and a new one was
                    // made, or a taker took it over (topology 3): a
                    // GoAway's deadline and hand-over were the old
                    // session's or the old owner's. (A draining session
                    // keeps its deadline: it still ends when its streams
                    // do, wherever it now lives.)
                    drain_until = None;
                    goaway_until = None;
                    handover = None;
                }
                last_rx = Instant::now();
                t = new_t;
            }
            Err(e) => {
                if main {
                    update(&report, |r| r.ended = Some(reason_str(&e)));
                } else {
                    end_streams(&mut agent, &transitions, &report, "go_away_deadline");
                }
                return;
            }
        }
    }
}

/// The session and the owner that holds it: either changing means the
/// session a GoAway was about is not the one served now.
fn owner_of(agent: &Agent) -> Option<(jvpn_proto::SessionId, String, u64)> {
    agent
        .session
        .as_ref()
        .map(|s| (s.id, s.node_id.clone(), s.incarnation))
}

/// Aborts a task when dropped (a hand-over's HELLO when the agent stops).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn agent_closed() -> Kind {
    Kind::Terminate(Terminate {
        reason: ReasonCode::AgentClosed as i32,
    })
}

/// The gateway is draining: makes the next session elsewhere in the
/// background (routers no longer place HELLOs on a draining gateway) while
/// the loop goes on serving this one; [`Ev::HandedOver`] brings it. With
/// `hold`, new streams wait for it instead of starting on a session that
/// is leaving.
fn hand_over(
    agent: &mut Agent,
    transitions: &Option<Transitions>,
    hold: bool,
) -> (HandOver, Option<SessionId>, AbortOnDrop) {
    if let Some((d, _)) = agent.data.as_mut().filter(|_| hold) {
        d.hold_new_streams();
    }
    let mut fork = agent.fork();
    // Not at the draining gateway first (behind routers: another router,
    // which places it elsewhere just the same).
    if fork.config().servers.len() > 1 {
        fork.rotate_server();
    }
    let tr = transitions.clone();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let r = establish_fresh(&mut fork, &tr, Some("go_away"), Persist::Limited).await;
        let _ = tx.send(r.map(|(t, fresh)| (t, fresh, fork)));
    });
    let replacing = agent.session.as_ref().map(|s| s.id);
    (rx, replacing, AbortOnDrop(task))
}

/// How long a HELLO keeps being retried while the cluster answers with
/// transient refusals (overloaded, no gateway yet, lease not ready).
const ESTABLISH_PATIENCE: Duration = Duration::from_secs(30);

/// Is this HELLO failure worth waiting out?
fn transient(e: &AgentError) -> bool {
    use jvpn_proto::preamble::Status;
    match e {
        AgentError::Status(s) => matches!(
            s.status,
            Status::Overloaded | Status::NoGateway | Status::OwnerUnreachable
        ),
        AgentError::Rejected { reason, .. } => matches!(
            reason,
            ReasonCode::Overloaded
                | ReasonCode::RateLimited
                | ReasonCode::NotInCluster
                | ReasonCode::Draining
        ),
        // A swamped gateway that answers late, like one that says so.
        AgentError::NoAnswer(_) => true,
        _ => false,
    }
}

/// HELLO with retries, adopted as the agent's session (see
/// [`establish_fresh`]).
async fn establish(
    agent: &mut Agent,
    transitions: &Option<Transitions>,
    after: Option<String>,
    persist: Persist<'_>,
) -> Result<Transport, AgentError> {
    let (t, fresh) = establish_fresh(agent, transitions, after.as_deref(), persist).await?;
    agent.adopt(fresh);
    Ok(t)
}

/// Counts a recovery by explicit re-handshake after the transport was lost
/// at `lost_at`: its time joins the recovery figures (a re-handshake is
/// how the session's user got back, and usually the slowest way).
fn rehandshaken(report: &Arc<Mutex<AgentReport>>, lost_at: Instant, why: &str) {
    let ms = lost_at.elapsed().as_millis() as u64;
    update(report, |r| {
        r.rehandshakes += 1;
        bump(&mut r.rehandshake_reasons, why);
        let [all, these, _] = &mut r.samples_seen;
        sample(&mut r.recovery_ms, all, ms);
        sample(&mut r.rehandshake_recovery_ms, these, ms);
    });
}

/// Whether HELLO retries end.
pub(crate) enum Persist<'a> {
    /// After [`ESTABLISH_PATIENCE`] of transient refusals or five other
    /// failures: the first handshake (a wrong address or CA should say so
    /// at once) and a hand-over (the current session still serves).
    Limited,
    /// Only when the agent is told to stop (`Close`, or its commands
    /// closed), or the cluster refuses its credential: the session was lost
    /// and the front doors wait for the next one. Past the limits above the
    /// waits grow to [`PERSIST_MAX_WAIT`], spread; a stop is taken only
    /// then, and ends it with the last failure, as the limit would have.
    UntilStopped(&'a mut mpsc::Receiver<Command>),
}

/// The longest wait between HELLOs of an agent that keeps trying.
const PERSIST_MAX_WAIT: Duration = Duration::from_secs(10);

/// The limits and waits of [`establish_fresh`]'s HELLO retries.
struct HelloPacing {
    started: Instant,
    /// Failures that are not [`transient`].
    hard_failures: u32,
    /// Retries made past the limits (only with [`Persist::UntilStopped`]).
    beyond: u32,
}

impl HelloPacing {
    fn new(started: Instant) -> Self {
        HelloPacing {
            started,
            hard_failures: 0,
            beyond: 0,
        }
    }

    /// Counts `e`; whether the limits are past: [`ESTABLISH_PATIENCE`] of
    /// transient refusals, or five other failures.
    fn failed(&mut self, e: &AgentError) -> bool {
        if transient(e) {
            self.started.elapsed() > ESTABLISH_PATIENCE
        } else {
            self.hard_failures += 1;
            self.hard_failures >= 5
        }
    }

    /// The wait before the next HELLO after `e`.
    fn wait(&mut self, e: &AgentError, past_limits: bool) -> Duration {
        let hinted = match e {
            AgentError::Status(s) => Some(s.capped_retry_after_ms(4_000).max(50)),
            AgentError::Rejected { retry_after_ms, .. } => Some((*retry_after_ms).clamp(50, 1_000)),
            _ => None,
        };
        if past_limits {
            // Kept trying: the longer of the hint and a growing step,
            // spread over half its length, so that agents that lost their
            // sessions together do not retry together for ever.
            // Each retry past the limits counts, transient or not.
            self.beyond += 1;
            let grown = (self.hard_failures + self.beyond).clamp(4, 7);
            let step = (100u64 << grown).max(hinted.unwrap_or(0));
            let step = Duration::from_millis(step).min(PERSIST_MAX_WAIT);
            step / 2 + step.mul_f64(rand::rng().random_range(0.0..0.5))
        } else {
            let jitter = Duration::from_millis(rand::rng().random_range(0..=50));
            Duration::from_millis(hinted.unwrap_or(100 << self.hard_failures.min(4))) + jitter
        }
    }
}

/// HELLO with retries (see [`Persist`]). `after`: the reason a previous
/// session ended (then this is an explicit re-handshake, and says so). The
/// agent's own session is left as it is.
async fn establish_fresh(
    agent: &mut Agent,
    transitions: &Option<Transitions>,
    after: Option<&str>,
    mut persist: Persist<'_>,
) -> Result<(Transport, Fresh), AgentError> {
    let mut pacing = HelloPacing::new(Instant::now());
    loop {
        let e = match agent.hello_only().await {
            Ok((t, fresh)) => {
                let what = match after {
                    Some(why) => format!("re-handshake after {why}"),
                    None => "handshake".into(),
                };
                note(
                    transitions,
                    format!(
                        "{what}: attached to {} (epoch {})",
                        fresh.session.node_id, fresh.session.binding_epoch
                    ),
                );
                return Ok((t, fresh));
            }
            Err(e) => e,
        };
        let past_limits = pacing.failed(&e);
        // A credential the cluster refuses will not get better by waiting.
        let final_refusal = matches!(
            e,
            AgentError::Rejected {
                reason: ReasonCode::AuthFailed,
                ..
            }
        );
        if past_limits && (matches!(persist, Persist::Limited) || final_refusal) {
            return Err(e);
        }
        let wait = pacing.wait(&e, past_limits);
        note(
            transitions,
            format!(
                "handshake failed: {}; retry in {} ms",
                reason_str(&e),
                wait.as_millis()
            ),
        );
        agent.rotate_server();
        match &mut persist {
            // Within the limits a stop waits, as it always did: the report
            // then says how the attempts ended (the load tool's invariants
            // read it).
            Persist::UntilStopped(stop) if past_limits => {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    c = stop.recv() => match c {
                        None | Some(Command::Close) => return Err(e),
                        // No session to echo over; a jump asks for a try now.
                        Some(Command::Echo(_, reply)) => {
                            let _ = reply.send(Err("no session".into()));
                        }
                        Some(Command::Jump | Command::StallAndJump) => {}
                    },
                }
            }
            _ => tokio::time::sleep(wait).await,
        }
    }
}

/// RESUME until attached, within the transport-lost TTL. Falls back to an
/// explicit re-handshake when the gateway says the session is gone.
async fn reattach(
    agent: &mut Agent,
    transitions: &Option<Transitions>,
    report: &Arc<Mutex<AgentReport>>,
    lost: Loss,
    main: bool,
    mut persist: Persist<'_>,
) -> Result<Transport, AgentError> {
    let lost_at = lost.at;
    // The gateway ended the session for a protocol error (its channel
    // broke there) while saying only `protocol_error`, which may also end
    // just the connection: a RESUME finds out, and a session it finds gone
    // is remade under the reason the gateway gave.
    let mut said_protocol_error = lost.said == Some(ReasonCode::ProtocolError);
    let policy = agent.session.as_ref().map(|s| s.policy).unwrap_or_default();
    let ttl = Duration::from_millis(policy.transport_lost_ttl_ms.max(1_000));
    // Until the gateway says otherwise (anti-flap can move its deadline
    // past the policy's TTL), the session lives for one TTL from the loss.
    let mut deadline = lost_at + ttl;
    let mut attempt = 0u32;
    let mut asked_another_router = false;
    // Given several gateways and no router, another server's
    // `unknown_session` may only mean it does not hold the session; behind
    // routers it is the owner's answer. So it is taken as final once the
    // session's own server failed to answer in this reattach, or the
    // second time; the first time, the agent asks its own server again.
    let mut home_failed = false;
    let mut asked_home_again = false;
    let reach = Reach::of(agent);
    agent.go_home();
    loop {
        // No pacing of its own: a RESUME after a loss is a recovery, and
        // when the gateway wants a wait it says how long.
        let attempt_started = Instant::now();
        let asked_home = agent.at_home();
        match agent.resume().await {
            Ok(t) => {
                let ms = lost_at.elapsed().as_millis() as u64;
                let took = attempt_started.elapsed().as_millis() as u64;
                // The agent's recovery figures are its main session's.
                if main {
                    let resumed = t.resumed_tls();
                    update(report, |r| {
                        r.resumes_ok += 1;
                        r.resumes_tls_resumed += u64::from(resumed);
                        let [all, _, these] = &mut r.samples_seen;
                        sample(&mut r.recovery_ms, all, ms);
                        sample(&mut r.resume_ms, these, took);
                    });
                }
                let epoch = agent.session.as_ref().map_or(0, |s| s.binding_epoch);
                if let Some(mig) = agent.take_migration() {
                    note(
                        transitions,
                        format!("owner {} gone: session taken over by {}", mig.from, mig.to),
                    );
                    update(report, |r| {
                        r.explicit_migrations += 1;
                        if mig.streams_reset > 0 {
                            *r.streams_reset.entry("taken_over".into()).or_insert(0) +=
                                mig.streams_reset;
                        }
                    });
                }
                if main {
                    record_attach(report, agent, false);
                }
                note(
                    transitions,
                    format!("reattached in {ms} ms (epoch {epoch})"),
                );
                return Ok(t);
            }
            Err(e) => {
                let mut why = reason_str(&e);
                update(report, |r| bump(&mut r.resumes_rejected, &why));
                if matches!(e, AgentError::Terminated(ReasonCode::ProtocolError)) {
                    // Instead of a ResumeOk: the channel could not go on.
                    said_protocol_error = true;
                }
                match e {
                    AgentError::Protocol(_) => update(report, |r| r.protocol_violations += 1),
                    AgentError::OwnerMismatch { .. } => {
                        update(report, |r| r.silent_migration_attempts += 1)
                    }
                    _ => {}
                }
                if let AgentError::Rejected {
                    transport_lost_deadline_ms: ms @ 1..,
                    ..
                } = &e
                {
                    deadline = Instant::now() + Duration::from_millis(*ms);
                }
                let remaining = deadline.saturating_duration_since(Instant::now());
                if asked_home && reach.home_failed(&e) {
                    home_failed = true;
                }
                let unknown = matches!(
                    e,
                    AgentError::Rejected {
                        reason: ReasonCode::UnknownSession,
                        ..
                    }
                );
                let not_asked_where_it_lives = unknown
                    && !asked_home
                    && !home_failed
                    && reach.asks_home_again(asked_home_again);
                if not_asked_where_it_lives && !remaining.is_zero() {
                    note(
                        transitions,
                        "unknown_session from a server the session was not made on: \
                         asking its own again"
                            .into(),
                    );
                    agent.go_home();
                    asked_home_again = true;
                    attempt += 1;
                    tokio::time::sleep(retry_wait(&e, attempt, remaining)).await;
                    continue;
                }
                let router_says_lost = matches!(&e, AgentError::Status(s)
                    if s.status == jvpn_proto::preamble::Status::OwnerLost);
                if router_says_lost
                    && !asked_another_router
                    && agent.config().servers.len() > 1
                    && !remaining.is_zero()
                {
                    // One router's view may lag (or be wrong): ask one more
                    // before giving the session up.
                    asked_another_router = true;
                    agent.rotate_server();
                    note(transitions, "owner_lost: asking another router".into());
                    continue;
                }
                if e.session_gone() || remaining.is_zero() {
                    // The owner itself found no session, within its TTL,
                    // after it had said `protocol_error`: that is why.
                    if unknown && said_protocol_error && !home_failed && !remaining.is_zero() {
                        why = "protocol_error".into();
                    }
                    end_streams(agent, transitions, report, &why);
                    if !main {
                        // A draining session is not made again.
                        return Err(e);
                    }
                    let persist = std::mem::replace(&mut persist, Persist::Limited);
                    let t = establish(agent, transitions, Some(why.clone()), persist).await?;
                    rehandshaken(report, lost_at, &why);
                    record_attach(report, agent, true);
                    return Ok(t);
                }
                let wait = retry_wait(&e, attempt, remaining);
                let wait = wait.min(remaining);
                note(
                    transitions,
                    format!("resume refused: {why}; retry in {} ms", wait.as_millis()),
                );
                if reach.moves_on(&e) {
                    agent.rotate_server();
                }
                attempt += 1;
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// How the session is reached, as its gateway said at HELLO
/// (`HelloOk.via_router`, design note 66): what a RESUME's failures say
/// about the session, and where the next one goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reach {
    /// Through routers: any of them reaches the owner, and the owner's
    /// `unknown_session` is final whichever router carried it.
    Routers,
    /// Gateways given directly: only the one that made the session holds
    /// it; the others know nothing of it.
    Direct,
    /// An older gateway did not say: the rules from before.
    Unsaid,
}

impl Reach {
    fn of(agent: &Agent) -> Self {
        match agent.session.as_ref().and_then(|s| s.via_router) {
            Some(true) => Reach::Routers,
            Some(false) => Reach::Direct,
            None => Reach::Unsaid,
        }
    }

    /// Whether the next RESUME goes to the next server after `e`.
    fn moves_on(self, e: &AgentError) -> bool {
        // A taker that finds the owner alive (topology 3) says
        // `owner_unreachable`: the router that sent us there may be the
        // one that is wrong.
        let owner_unreachable = matches!(
            e,
            AgentError::Rejected {
                reason: ReasonCode::OwnerUnreachable,
                ..
            }
        );
        match self {
            // A router that does not answer, or answers for itself before
            // TLS (a hung, swamped or restarting one), is stepped around:
            // the owner is as near through the next.
            Reach::Routers => {
                owner_unreachable
                    || matches!(
                        e,
                        AgentError::Connect(..)
                            | AgentError::Status(_)
                            | AgentError::Tls(_)
                            | AgentError::NoAnswer(_)
                    )
            }
            // Another gateway cannot help, except to tell a refused
            // connection (its process gone, and the session with it) apart
            // from a passing failure.
            Reach::Direct => refused(e),
            Reach::Unsaid => {
                owner_unreachable || matches!(e, AgentError::Connect(..) | AgentError::Status(_))
            }
        }
    }

    /// Whether `e`, from the session's own server, says that server no
    /// longer holds it (so another's `unknown_session` may be believed).
    fn home_failed(self, e: &AgentError) -> bool {
        match self {
            // A timeout, an unreachable network (the agent's own, after a
            // change), an overloaded gateway: nothing about the session.
            Reach::Direct => refused(e),
            Reach::Routers | Reach::Unsaid => matches!(
                e,
                AgentError::Connect(..) | AgentError::Tls(_) | AgentError::NoAnswer(_)
            ),
        }
    }

    /// Whether another server's `unknown_session` sends the agent to ask
    /// its own server (again), `asked` being whether it did once already.
    fn asks_home_again(self, asked: bool) -> bool {
        match self {
            // The owner answered, through whichever router.
            Reach::Routers => false,
            // Only the session's own gateway can say: as often as it takes,
            // until the deadline.
            Reach::Direct => true,
            Reach::Unsaid => !asked,
        }
    }
}

/// A connection the server's host refused: nothing listens there.
fn refused(e: &AgentError) -> bool {
    matches!(e, AgentError::Connect(_, io) if io.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// An echo sent, waiting for its reply.
struct Echoing {
    seq: u64,
    payload: Vec<u8>,
    start: Instant,
    reply: oneshot::Sender<Result<Duration, String>>,
}

/// A transport loss: when, and the reason the gateway gave if it ended
/// the connection with a `Terminate`.
#[derive(Clone, Copy, Debug)]
struct Loss {
    at: Instant,
    said: Option<ReasonCode>,
}

/// How long to wait before the next RESUME after `e` (attempt `attempt`,
/// `remaining` until the session's deadline): what the server asked for,
/// and when it says it is overloaded, at least an exponential step,
/// jittered, so a storm of agents spreads out instead of retrying in
/// lockstep. No hint (e.g. `bad_preamble` from a router that cannot open our
/// token) is no reason to retry at once: that backs off too.
fn retry_wait(e: &AgentError, attempt: u32, remaining: Duration) -> Duration {
    let exp = || {
        let base = 25u64 << attempt.min(6);
        Duration::from_millis(base + rand::rng().random_range(0..=base))
    };
    let overloaded = matches!(e, AgentError::Status(s)
        if s.status == jvpn_proto::preamble::Status::Overloaded)
        || matches!(e, AgentError::Rejected { reason, .. }
            if matches!(reason, ReasonCode::Overloaded | ReasonCode::RateLimited));
    let hint = match e {
        AgentError::Rejected { retry_after_ms, .. } if *retry_after_ms > 0 => {
            Some(Duration::from_millis(*retry_after_ms))
        }
        AgentError::Status(s) => Some(Duration::from_millis(
            s.capped_retry_after_ms(remaining.as_millis() as u64),
        )),
        _ => None,
    }
    .filter(|d| !d.is_zero());
    let wait = match (hint, overloaded) {
        (Some(h), true) => h.max(exp()).min(remaining / 4),
        (Some(h), false) => h,
        (None, _) => exp(),
    };
    wait.min(remaining)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jvpn_proto::preamble::{Status, StatusReply};

    /// An agent that recovers again and again for days (a path reset every
    /// second) keeps its recent recovery figures, not every one of them.
    #[test]
    fn recovery_figures_stay_bounded() {
        let report = Arc::new(Mutex::new(AgentReport::default()));
        let n = RECOVERY_SAMPLES + 1_000;
        for _ in 0..n {
            rehandshaken(&report, Instant::now(), "owner_lost");
        }
        let r = report.lock().unwrap();
        assert_eq!(r.rehandshakes, n as u64);
        assert_eq!(r.recovery_ms.len(), RECOVERY_SAMPLES);
        assert_eq!(r.rehandshake_recovery_ms.len(), RECOVERY_SAMPLES);
        drop(r);
        // The ring keeps the latest: a marked figure written last is there,
        // and after a whole lap more it is gone.
        let mark = |lost_ms: u64| {
            let at = Instant::now()
                .checked_sub(Duration::from_millis(lost_ms))
                .unwrap();
            rehandshaken(&report, at, "owner_lost");
        };
        mark(60_000);
        let has = |r: &AgentReport| r.recovery_ms.iter().any(|ms| *ms >= 60_000);
        assert!(has(&report.lock().unwrap()));
        for _ in 0..RECOVERY_SAMPLES {
            rehandshaken(&report, Instant::now(), "owner_lost");
        }
        assert!(!has(&report.lock().unwrap()));
    }

    fn status(status: Status, retry_after_ms: u16) -> AgentError {
        AgentError::Status(StatusReply {
            status,
            retry_after_ms,
        })
    }

    /// An agent that keeps trying (its session lost, the cluster without
    /// a gateway to place it on) waits longer and longer, up to
    /// `PERSIST_MAX_WAIT`, whatever the refusal: 10,000 agents retrying
    /// about once a second for as long as an outage lasts are a storm of
    /// their own when it ends.
    #[test]
    fn waits_past_the_limits_grow_for_transient_refusals_too() {
        for e in [
            status(Status::NoGateway, 1_000),
            status(Status::Overloaded, 500),
            AgentError::NoAnswer(Duration::from_secs(5)),
        ] {
            let long_ago = Instant::now()
                .checked_sub(ESTABLISH_PATIENCE + Duration::from_secs(1))
                .unwrap();
            let mut p = HelloPacing::new(long_ago);
            let mut waits = Vec::new();
            for _ in 0..8 {
                let past = p.failed(&e);
                assert!(past);
                waits.push(p.wait(&e, past));
            }
            let last = *waits.last().unwrap();
            assert!(
                last >= PERSIST_MAX_WAIT / 2 && last <= PERSIST_MAX_WAIT,
                "{e}: {waits:?}"
            );
        }
    }

    /// What a RESUME's failure means depends on how the session is
    /// reached (design note 66); a session from an older gateway, which
    /// does not say, keeps the rules from before.
    #[test]
    fn each_reach_reads_a_resumes_failures_its_own_way() {
        use std::io::{Error, ErrorKind};
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], 1).into();
        let connect = |k: ErrorKind| AgentError::Connect(addr, Error::from(k));
        let refused = connect(ErrorKind::ConnectionRefused);
        let timed_out = connect(ErrorKind::TimedOut);
        let tls = AgentError::Tls(Error::from(ErrorKind::TimedOut));
        let silent = AgentError::NoAnswer(Duration::from_secs(5));
        let busy = status(Status::Overloaded, 500);
        // Through routers: every failure of a router moves on.
        for e in [&refused, &timed_out, &tls, &silent, &busy] {
            assert!(Reach::Routers.moves_on(e), "{e}");
        }
        assert!(!Reach::Routers.asks_home_again(false));
        // Direct: only a refused connection (nothing listens) moves on and
        // counts as the home gateway gone.
        assert!(Reach::Direct.moves_on(&refused));
        assert!(Reach::Direct.home_failed(&refused));
        for e in [&timed_out, &tls, &silent, &busy] {
            assert!(!Reach::Direct.moves_on(e), "{e}");
            assert!(!Reach::Direct.home_failed(e), "{e}");
        }
        assert!(Reach::Direct.asks_home_again(true));
        // Unsaid (an older gateway): as before.
        assert!(Reach::Unsaid.moves_on(&timed_out));
        assert!(Reach::Unsaid.moves_on(&busy));
        assert!(!Reach::Unsaid.moves_on(&tls));
        assert!(!Reach::Unsaid.moves_on(&silent));
        for e in [&timed_out, &tls, &silent] {
            assert!(Reach::Unsaid.home_failed(e), "{e}");
        }
        assert!(!Reach::Unsaid.home_failed(&busy));
        assert!(Reach::Unsaid.asks_home_again(false));
        assert!(!Reach::Unsaid.asks_home_again(true));
    }

    /// Issue 18 M2: a refusal without a hint (a router that cannot open the
    /// token answers `bad_preamble`, retry 0) used to be retried at once, in
    /// a tight loop for the whole TTL.
    #[test]
    fn a_refusal_without_a_hint_backs_off_exponentially() {
        let remaining = Duration::from_secs(30);
        let bad = status(Status::BadPreamble, 0);
        for attempt in 0..8 {
            let w = retry_wait(&bad, attempt, remaining);
            let base = 25u64 << attempt.min(6);
            assert!(
                (base..=2 * base).contains(&(w.as_millis() as u64)),
                "attempt {attempt}: waited {w:?}"
            );
        }
    }

    #[test]
    fn a_hint_is_followed_and_the_deadline_caps_every_wait() {
        let remaining = Duration::from_secs(30);
        let w = retry_wait(&status(Status::OwnerUnreachable, 300), 0, remaining);
        assert_eq!(w, Duration::from_millis(300));
        // Overloaded: at least the exponential step, at most a quarter of
        // what is left.
        let w = retry_wait(&status(Status::Overloaded, 10), 6, remaining);
        assert!(w >= Duration::from_millis(1_600), "{w:?}");
        let w = retry_wait(
            &status(Status::BadPreamble, 0),
            6,
            Duration::from_millis(40),
        );
        assert!(w <= Duration::from_millis(40), "{w:?}");
    }
}
