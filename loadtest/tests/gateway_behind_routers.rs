//! A gateway in cluster mode: PROXY v2 mandatory from configured routers,
//! refused from anyone else, direct clients refused, intended-owner check
//! before TLS, LOCAL health checks.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use jvpn_agent::AgentError;
use jvpn_loadtest::faultproxy::FaultProxy;
use jvpn_loadtest::harness::{self, GatewayOptions, eventually};
use jvpn_proto::preamble::{Preamble, Status};
use jvpn_proto::proxy::ProxyHeader;
use jvpn_proto::{Incarnation, NodeId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

async fn cluster_gateway() -> common::Env {
    common::start_with(GatewayOptions {
        extra_toml: String::new(),
        env: vec![("JVPN_GATEWAY__CLUSTER__ROUTERS".into(), "127.0.0.1".into())],
        ..Default::default()
    })
    .await
}

fn proxy_header(intended: Option<(&str, u64)>) -> Vec<u8> {
    ProxyHeader {
        addresses: Some((
            "10.9.8.7:5555".parse().unwrap(),
            "198.51.100.2:7443".parse().unwrap(),
        )),
        router_id: Some("r1".into()),
        view_id: None,
        intended_owner: intended.map(|(n, i)| (NodeId::new(n).unwrap(), Incarnation(i))),
        takeover: false,
    }
    .encode()
    .unwrap()
}

async fn connect_from(ip: &str, to: std::net::SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

async fn status_reply(s: &mut TcpStream) -> Option<Status> {
    let mut b = [0u8; 8];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b)).await {
        Ok(Ok(_)) => jvpn_proto::preamble::StatusReply::decode(&b)
            .ok()
            .map(|r| r.status),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_is_mandatory_from_routers_and_refused_from_others() {
    let env = cluster_gateway().await;
    let gw = env.gw.client_addr;

    // A router (127.0.0.1) without PROXY: refused.
    let mut s = connect_from("127.0.0.1", gw).await;
    s.write_all(&Preamble::Hello { key_id: 0 }.encode())
        .await
        .unwrap();
    assert_eq!(status_reply(&mut s).await, Some(Status::BadPreamble));

    // A non-router sending PROXY: refused.
    let mut s = connect_from("127.0.0.2", gw).await;
    s.write_all(&proxy_header(None)).await.unwrap();
    s.write_all(&Preamble::Hello { key_id: 0 }.encode())
        .await
        .unwrap();
    assert_eq!(status_reply(&mut s).await, Some(Status::BadPreamble));

    // A non-router connecting directly, no PROXY: refused in cluster mode.
    let mut s = connect_from("127.0.0.3", gw).await;
    s.write_all(&Preamble::Hello { key_id: 0 }.encode())
        .await
        .unwrap();
    assert_eq!(status_reply(&mut s).await, Some(Status::NoGateway));

    // A LOCAL health check from a router: closed, counted, not a rejection.
    let mut s = connect_from("127.0.0.1", gw).await;
    s.write_all(&ProxyHeader::local().encode().unwrap())
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty());

    for (reason, want) in [
        ("proxy_required", 1.0),
        ("proxy_forbidden", 1.0),
        ("direct_forbidden", 1.0),
    ] {
        eventually(Duration::from_secs(5), reason, || async {
            common::rejected(&env, reason).await == want
        })
        .await
        .unwrap();
    }
    let hc = env
        .gw
        .metric("jvpn_gateway_proxy_health_checks_total", &[])
        .await
        .unwrap();
    assert_eq!(hc, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_work_through_a_router_and_a_stale_owner_gets_owner_lost() {
    let env = cluster_gateway().await;
    // Stand-in router: the fault proxy connects from the agent's source IP
    // (127.0.0.1 here) and writes the PROXY header first.
    let router = FaultProxy::with_prefix(env.gw.client_addr, proxy_header(None))
        .await
        .unwrap();
    let mut a = harness::agent(&env.pki, router.addr, Some("127.0.0.1".parse().unwrap())).unwrap();
    let mut t = common::hello(&mut a).await;
    t.echo(b"through the router").await.unwrap();

    // A RESUME the router aims at another incarnation of g1: owner_lost before TLS.
    let stale = FaultProxy::with_prefix(env.gw.client_addr, proxy_header(Some(("g1", 12345))))
        .await
        .unwrap();
    let mut b = harness::agent(&env.pki, stale.addr, Some("127.0.0.1".parse().unwrap())).unwrap();
    b.session = a.session.clone();
    match b.resume().await {
        Err(AgentError::Status(s)) => {
            assert_eq!(s.status, Status::OwnerLost);
            assert!(AgentError::Status(s).session_gone(), "owner_lost is final");
        }
        other => panic!("expected owner_lost, got {other:?}"),
    }
    common::wait_rejected(&env, "owner_lost", 1.0).await;
    // The session itself is untouched and still answers through the router.
    t.echo(b"still here").await.unwrap();
}
