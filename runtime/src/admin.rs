//! Admin HTTP (loopback by default): `/metrics`, `/healthz`, `/readyz`, plus
//! JSON routes of the binary (`/sessions` on gateways, `/ring` on routers),
//! and operator actions behind a bearer token (`admin_token_file`):
//! `POST /drain` on both, `GET /sessions/<id>` on gateways.
//! Plain hyper: no framework. Shared by every binary through [`AdminApp`].

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

/// The operator token, kept only as a hash (compared in constant time).
#[derive(Clone)]
pub struct AdminToken(blake3::Hash);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// The admin token in force: set at start, replaced by each reload that
/// passed (a token file rewritten to revoke a leaked token takes effect on
/// `SIGHUP`, not at the next restart).
#[derive(Debug, Default)]
pub struct LiveToken(std::sync::Mutex<Option<AdminToken>>);

impl LiveToken {
    pub fn new(token: Option<AdminToken>) -> Self {
        Self(std::sync::Mutex::new(token))
    }

    pub fn get(&self) -> Option<AdminToken> {
        crate::wire::lock(&self.0).clone()
    }

    pub fn set(&self, token: Option<AdminToken>) {
        *crate::wire::lock(&self.0) = token;
    }
}

/// Why an admin token file was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    /// The file could not be read.
    #[error("{path}: {error}")]
    Read { path: String, error: std::io::Error },
    /// The token is shorter than [`MIN_TOKEN_LEN`].
    #[error("the token must be at least {MIN_TOKEN_LEN} characters")]
    TooShort,
}

/// Shortest admin token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

impl AdminToken {
    /// Reads a token file (surrounding whitespace ignored).
    pub fn load(path: &std::path::Path) -> Result<Self, AdminTokenError> {
        let text = std::fs::read_to_string(path).map_err(|e| AdminTokenError::Read {
            path: path.display().to_string(),
            error: e,
        })?;
        let token = text.trim();
        if token.len() < MIN_TOKEN_LEN {
            return Err(AdminTokenError::TooShort);
        }
        Ok(Self(blake3::hash(token.as_bytes())))
    }

    fn admits(&self, req: &Request<Incoming>) -> bool {
        let presented = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // blake3::Hash compares in constant time.
        presented.is_some_and(|p| blake3::hash(p.trim().as_bytes()) == self.0)
    }
}

/// Starts a drain from the admin port, as SIGTERM would.
#[derive(Clone, Debug)]
pub struct DrainTrigger(Arc<tokio::sync::watch::Sender<bool>>);

impl Default for DrainTrigger {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::channel(false).0))
    }
}

impl DrainTrigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }

    /// Resolves when `shutdown` does or the trigger fires.
    pub async fn or(&self, shutdown: impl std::future::Future<Output = ()>) {
        let mut rx = self.0.subscribe();
        tokio::select! {
            () = shutdown => {}
            _ = rx.wait_for(|fired| *fired) => {}
        }
    }
}

/// Why an operator action on one member was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberRefused {
    /// No such member (404).
    Unknown,
    /// Not in a state that allows it, and why (409).
    Conflict(String),
}

/// What a binary exposes on its admin port.
pub trait AdminApp: Clone + Send + Sync + 'static {
    /// `Some(why)` makes `/readyz` answer 503 with that word.
    fn not_ready(&self) -> Option<&'static str>;
    /// JSON for binary-specific paths; `None` is a 404.
    fn json(&self, path: &str) -> Option<serde_json::Value>;
    /// The token that guards operator actions; `None`: they are disabled.
    fn token(&self) -> Option<AdminToken>;
    /// `POST /drain`.
    fn drain(&self) -> &DrainTrigger;
    /// `POST /leave`: marks the process as leaving for good before the
    /// drain starts; false where the binary has no such notion (404).
    fn leave(&self) -> bool {
        false
    }
    /// `POST /members/<node_id>/forget`: forgets a gateway that is gone for
    /// good; `None` where the binary has no members (404).
    fn forget_member(&self, _node_id: &str) -> Option<Result<serde_json::Value, MemberRefused>> {
        None
    }
    /// `GET /sessions/<id>`: `Some(None)` for an unknown id, `None` where the
    /// binary has no sessions.
    fn session(&self, _id: &str) -> Option<Option<serde_json::Value>> {
        None
    }
    /// Series drawn from the binary's state at scrape time, appended to the
    /// recorder's (Prometheus text format): for series that must disappear,
    /// which the recorder cannot do.
    fn state_metrics(&self) -> String {
        String::new()
    }
}

/// Connections the admin port holds at once; past it new ones are closed.
pub const MAX_ADMIN_CONNECTIONS: usize = 256;
/// A request's headers must arrive within this (slowloris).
pub const ADMIN_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves the admin port until the task is dropped.
pub async fn serve<A: AdminApp>(listener: TcpListener, gw: A, prom: Option<PrometheusHandle>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        // Backs off on errors: out of descriptors, a bare `continue` spun
        // a worker the sessions share.
        let (stream, _) = crate::wire::accept(&listener).await;
        // Full: drop the connection rather than queue it behind idle ones.
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (gw, prom) = (gw.clone(), prom.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let resp = route(&req, &gw, prom.as_ref());
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, body: String, ctype: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    r
}

fn json_reply(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    text(status, body.to_string() + "\n", "application/json")
}

/// Operator actions: the token first, then the action.
fn privileged<A: AdminApp>(req: &Request<Incoming>, app: &A) -> Option<Response<Full<Bytes>>> {
    let path = req.uri().path();
    let lookup = path.strip_prefix("/sessions/");
    let forget = path
        .strip_prefix("/members/")
        .and_then(|p| p.strip_suffix("/forget"));
    if path != "/drain" && path != "/leave" && lookup.is_none() && forget.is_none() {
        return None;
    }
    let refuse = |status, why: &str| Some(json_reply(status, &serde_json::json!({ "error": why })));
    let Some(token) = app.token() else {
        return refuse(StatusCode::FORBIDDEN, "admin_token_file is not configured");
    };
    if !token.admits(req) {
        return refuse(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    if let Some(node) = forget {
        if req.method() != Method::POST {
            return refuse(StatusCode::METHOD_NOT_ALLOWED, "use POST");
        }
        return match app.forget_member(node) {
            Some(Ok(body)) => Some(json_reply(StatusCode::OK, &body)),
            Some(Err(MemberRefused::Unknown)) => refuse(StatusCode::NOT_FOUND, "no such gateway"),
            Some(Err(MemberRefused::Conflict(why))) => refuse(StatusCode::CONFLICT, &why),
            None => refuse(StatusCode::NOT_FOUND, "no members here"),
        };
    }
    match (req.method(), lookup) {
        (&Method::POST, None) if path == "/leave" => {
            if !app.leave() {
                return refuse(StatusCode::NOT_FOUND, "no /leave here");
            }
            app.drain().fire();
            Some(json_reply(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "draining": true, "leaving": true }),
            ))
        }
        (&Method::POST, None) => {
            app.drain().fire();
            Some(json_reply(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "draining": true }),
            ))
        }
        (_, None) => refuse(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        (&Method::GET, Some(id)) => match app.session(id) {
            Some(Some(body)) => Some(json_reply(StatusCode::OK, &body)),
            Some(None) => refuse(StatusCode::NOT_FOUND, "no such session"),
            None => None,
        },
        (_, Some(_)) => refuse(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
    }
}

fn route<A: AdminApp>(
    req: &Request<Incoming>,
    gw: &A,
    prom: Option<&PrometheusHandle>,
) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if let Some(r) = privileged(req, gw) {
        return r;
    }
    match req.uri().path() {
        "/metrics" => match prom {
            Some(p) => {
                let mut body = p.render();
                if !body.is_empty() && !body.ends_with('\n') {
                    body.push('\n');
                }
                body.push_str(&gw.state_metrics());
                text(StatusCode::OK, body, "text/plain; version=0.0.4")
            }
            None => text(
                StatusCode::NOT_FOUND,
                "metrics not installed\n".into(),
                PLAIN,
            ),
        },
        "/healthz" => text(StatusCode::OK, "ok\n".into(), PLAIN),
        "/readyz" => match gw.not_ready() {
            Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"), PLAIN),
            None => text(StatusCode::OK, "ready\n".into(), PLAIN),
        },
        path => match gw.json(path) {
            Some(body) => json_reply(StatusCode::OK, &body),
            None => text(StatusCode::NOT_FOUND, "not found\n".into(), PLAIN),
        },
    }
}
