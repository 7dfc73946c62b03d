//! Admin HTTP (loopback by default): `/metrics`, `/healthz`, `/readyz`, plus
//! JSON routes of the binary (`/sessions` on gateways, `/ring` on routers).
//! Plain hyper: no framework. Shared by every binary through [`AdminApp`].

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::server::GatewayHandle;

/// What a binary exposes on its admin port.
pub trait AdminApp: Clone + Send + Sync + 'static {
    /// `Some(why)` makes `/readyz` answer 503 with that word.
    fn not_ready(&self) -> Option<&'static str>;
    /// JSON for binary-specific paths; `None` is a 404.
    fn json(&self, path: &str) -> Option<serde_json::Value>;
}

impl AdminApp for GatewayHandle {
    fn not_ready(&self) -> Option<&'static str> {
        self.is_draining().then_some("draining")
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

pub async fn serve<A: AdminApp>(listener: TcpListener, gw: A, prom: Option<PrometheusHandle>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (gw, prom) = (gw.clone(), prom.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = route(&req, &gw, prom.as_ref());
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
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

fn route<A: AdminApp>(
    req: &Request<Incoming>,
    gw: &A,
    prom: Option<&PrometheusHandle>,
) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    match req.uri().path() {
        "/metrics" => match prom {
            Some(p) => text(StatusCode::OK, p.render(), "text/plain; version=0.0.4"),
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
            Some(body) => text(StatusCode::OK, body.to_string() + "\n", "application/json"),
            None => text(StatusCode::NOT_FOUND, "not found\n".into(), PLAIN),
        },
    }
}
