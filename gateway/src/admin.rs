//! Admin HTTP (loopback by default): `/metrics`, `/healthz`, `/readyz`,
//! `/sessions`. Plain hyper: no framework, nothing but these four routes.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::server::GatewayHandle;

pub async fn serve(listener: TcpListener, gw: GatewayHandle, prom: Option<PrometheusHandle>) {
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

fn route(
    req: &Request<Incoming>,
    gw: &GatewayHandle,
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
        "/readyz" => {
            if gw.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into(), PLAIN)
            } else {
                text(StatusCode::OK, "ready\n".into(), PLAIN)
            }
        }
        "/sessions" => {
            let counts: serde_json::Map<String, serde_json::Value> = gw
                .session_counts()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.into()))
                .collect();
            let total: u64 = gw.session_counts().iter().map(|(_, v)| v).sum();
            let body = serde_json::json!({ "total": total, "by_state": counts });
            text(StatusCode::OK, body.to_string() + "\n", "application/json")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), PLAIN),
    }
}
