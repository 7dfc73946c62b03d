//! The flood scenarios: HELLOs from a few sources (`handshake-flood`) and
//! captured RESUMEs replayed (`replay-flood`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use jvpn_runtime::wire::lock;

use super::report::FloodReport;
use crate::harness::{self, TestPki};

fn reason_of(e: &jvpn_agent::AgentError) -> String {
    match e {
        jvpn_agent::AgentError::Status(s) => s.status.reason().to_string(),
        jvpn_agent::AgentError::Rejected { reason, .. } => reason.to_string(),
        other => {
            let t = other.to_string();
            t.split(':')
                .next()
                .unwrap_or("error")
                .trim()
                .replace(' ', "_")
        }
    }
}

/// HELLOs at `rate` from three flood sources until `stop`.
pub(super) async fn hello_flood(
    pki: TestPki,
    entry: Vec<SocketAddr>,
    rate: f64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<FloodReport> {
    let report = Arc::new(Mutex::new(FloodReport::default()));
    let step = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    let mut due = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0usize;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        due += step;
        tokio::time::sleep_until(due.into()).await;
        // Flood sources sit far from the fleet's 127.0.1.x range.
        let cfg = harness::agent_config(
            &pki,
            entry.clone(),
            Some(harness::source_ip(60_000 + i % 3)),
        )?;
        i += 1;
        let report = report.clone();
        tasks.spawn(async move {
            let mut a = match jvpn_agent::Agent::new(cfg) {
                Ok(a) => a,
                Err(_) => return,
            };
            let r = a.hello().await;
            let mut f = lock(&report);
            f.attempts += 1;
            match r {
                Ok(_) => f.admitted += 1,
                Err(e) => {
                    f.refused += 1;
                    if matches!(e, jvpn_agent::AgentError::Status(_)) {
                        f.refused_before_tls += 1;
                    }
                    *f.refused_by_reason.entry(reason_of(&e)).or_insert(0) += 1;
                }
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let out = lock(&report).clone();
    Ok(out)
}

/// Replays one captured `Resume` frame over new connections at `rate`.
pub(super) async fn replay_flood(
    pki: TestPki,
    entry: Vec<SocketAddr>,
    rate: f64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<FloodReport> {
    use jvpn_proto::pb::session::frame::Kind;
    let cfg = harness::agent_config(&pki, entry.clone(), Some(harness::source_ip(61_000)))?;
    let mut victim = jvpn_agent::Agent::new(cfg)?;
    let live = victim.hello().await?;
    // Capture a genuine Resume, bound to a connection the attacker saw.
    let seen = victim.open_resume().await?;
    let captured = victim.build_resume(&seen)?;
    drop(seen);
    let mut f = FloodReport::default();
    let step = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    let mut due = Instant::now();
    let mut i = 0usize;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        due += step;
        tokio::time::sleep_until(due.into()).await;
        let mut attacker = jvpn_agent::Agent::new(harness::agent_config(
            &pki,
            entry.clone(),
            Some(harness::source_ip(61_001 + i % 100)),
        )?)?;
        i += 1;
        attacker.session = victim.session.clone();
        f.attempts += 1;
        let mut t = match attacker.open_resume().await {
            Ok(t) => t,
            Err(e) => {
                f.refused += 1;
                *f.refused_by_reason.entry(reason_of(&e)).or_insert(0) += 1;
                continue;
            }
        };
        let answer = match t.send(Kind::Resume(captured.clone())).await {
            Ok(()) => t.recv().await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(Kind::ResumeOk(_)) => f.admitted += 1,
            Ok(Kind::Reject(r)) => {
                f.refused += 1;
                let why = jvpn_proto::ReasonCode::try_from(r.reason)
                    .map_or_else(|_| "unknown".to_owned(), |c| c.to_string());
                *f.refused_by_reason.entry(why).or_insert(0) += 1;
            }
            Ok(_) | Err(_) => {
                f.refused += 1;
                *f.refused_by_reason.entry("closed".into()).or_insert(0) += 1;
            }
        }
    }
    drop(live);
    f.victim_resumed_after = Some(victim.resume().await.is_ok());
    Ok(f)
}
