//! Who may join the membership plane: identity from the certificate's URI
//! SAN only, advertised addresses the certificate names, capped weights,
//! certificates from the membership CA with the client role. And on the
//! data plane: gateways in cluster mode refuse direct clients and PROXY
//! headers from anyone but routers.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use jvpn_loadtest::cluster::ClusterOptions;
use jvpn_loadtest::harness::{CLUSTER, TestPki, eventually};
use jvpn_proto::pb::membership::membership_client::MembershipClient;
use jvpn_proto::pb::membership::{HeartbeatReply, HeartbeatRequest, NodeState};
use jvpn_proto::preamble::{Preamble, Status, StatusReply};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn request(node: &str, advertise: &str, weight: u32) -> HeartbeatRequest {
    HeartbeatRequest {
        node_id: node.into(),
        incarnation: 42,
        advertise_addr: advertise.into(),
        state: NodeState::Ready as i32,
        weight,
        sessions: 0,
        lease_ok: false,
        build_version: "test".into(),
        sequence: 1,
        in_view: false,
        // As a gateway one version older sends it.
        incarnation_ordered: false,
        secret_proof: Vec::new(),
        known_view_id: Vec::new(),
        accepts_view_delta: false,
        agent_silence_ms: 0,
        leaving: false,
    }
}

/// A heartbeat stream over fresh mTLS: where requests go, and the replies.
type Stream = (
    tokio::sync::mpsc::Sender<HeartbeatRequest>,
    tonic::Streaming<HeartbeatReply>,
);

/// Opens a heartbeat stream with `first` as its first request; `Err`
/// carries why it failed.
async fn open_stream(
    router: std::net::SocketAddr,
    identity: Option<(&Path, &Path)>,
    ca: &Path,
    first: HeartbeatRequest,
) -> Result<Stream, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name(format!("router.{CLUSTER}"));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    let channel = Endpoint::from_shared(format!("https://{router}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut client = MembershipClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(first).await.unwrap();
    let replies = tokio::time::timeout(
        Duration::from_secs(5),
        client.heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .map_err(|_| "timeout".to_string())?
    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
    .into_inner();
    Ok((tx, replies))
}

/// The next reply on a stream; `Err` carries why there was none.
async fn next_reply(
    replies: &mut tonic::Streaming<HeartbeatReply>,
) -> Result<HeartbeatReply, String> {
    match tokio::time::timeout(Duration::from_secs(5), replies.message()).await {
        Ok(Ok(Some(r))) => Ok(r),
        Ok(Ok(None)) => Err("stream closed".into()),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err("timeout".into()),
    }
}

/// One heartbeat over a fresh mTLS stream; `Err` carries why it failed.
async fn heartbeat(
    router: std::net::SocketAddr,
    identity: Option<(&Path, &Path)>,
    ca: &Path,
    req: HeartbeatRequest,
) -> Result<HeartbeatReply, String> {
    let (_tx, mut replies) = open_stream(router, identity, ca, req).await?;
    next_reply(&mut replies).await
}

/// Would-be gateway `g4` of a cluster: its membership files and a client
/// port it really holds (the address it advertises).
struct Candidate {
    ca: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    port: tokio::net::TcpListener,
}

impl Candidate {
    async fn new(c: &jvpn_loadtest::cluster::LocalCluster) -> Self {
        let l = &c.pki.layout;
        Self {
            ca: l.membership_ca(),
            cert: l.membership_cert("g4"),
            key: l.membership_key("g4"),
            port: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    fn id(&self) -> Option<(&Path, &Path)> {
        Some((self.cert.as_path(), self.key.as_path()))
    }

    fn own(&self) -> String {
        self.port.local_addr().unwrap().to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_certified_gateways_join_under_their_own_name_and_address() {
    let c = common::cluster(ClusterOptions::default()).await;
    let r = &c.routers[0];
    let l = &c.pki.layout;
    let g = Candidate::new(&c).await;
    let (ca, g4_id, own) = (g.ca.clone(), g.id(), g.own());
    let foreign = format!("127.0.0.9:{}", g.port.local_addr().unwrap().port());

    // Another node's name with g4's certificate.
    let e = heartbeat(r.membership_addr, g4_id, &ca, request("g1", &own, 1))
        .await
        .unwrap_err();
    assert!(e.contains("PermissionDenied"), "{e}");
    // An address the certificate does not name.
    let e = heartbeat(r.membership_addr, g4_id, &ca, request("g4", &foreign, 1))
        .await
        .unwrap_err();
    assert!(
        e.contains("PermissionDenied") && e.contains("advertise"),
        "{e}"
    );
    // A weight above max_weight.
    let e = heartbeat(r.membership_addr, g4_id, &ca, request("g4", &own, 17))
        .await
        .unwrap_err();
    assert!(
        e.contains("PermissionDenied") && e.contains("weight"),
        "{e}"
    );
    // No client certificate, a certificate from another CA, a router's
    // (server-role) certificate: the TLS handshake itself fails.
    assert!(
        heartbeat(r.membership_addr, None, &ca, request("g4", &own, 1))
            .await
            .is_err()
    );
    let other = TestPki::new(&["g4"]).unwrap();
    let (oc, ok) = (
        other.layout.membership_cert("g4"),
        other.layout.membership_key("g4"),
    );
    assert!(
        heartbeat(
            r.membership_addr,
            Some((&oc, &ok)),
            &ca,
            request("g4", &own, 1)
        )
        .await
        .is_err()
    );
    let (rc, rk) = (l.router_cert("r1"), l.router_key("r1"));
    assert!(
        heartbeat(
            r.membership_addr,
            Some((&rc, &rk)),
            &ca,
            request("g4", &own, 1)
        )
        .await
        .is_err()
    );
    for reason in ["identity", "advertise", "weight"] {
        assert_eq!(
            r.metric(
                "jvpn_router_membership_refused_total",
                &[("reason", reason)]
            )
            .await
            .unwrap(),
            1.0,
            "{reason}"
        );
    }
    let known: Vec<String> = r.ring().await.unwrap()["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["node_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(known, ["g1", "g2", "g3"], "nobody joined");

    // Control: the same certificate, honestly used, is accepted.
    let reply = heartbeat(r.membership_addr, g4_id, &ca, request("g4", &own, 1))
        .await
        .unwrap();
    assert_eq!(reply.sequence, 1);
    assert_eq!(reply.router_id, "r1");
    assert!(!reply.superseded);
    assert_eq!(reply.members.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_in_a_cluster_refuse_direct_clients_and_foreign_proxy_headers() {
    let c = common::cluster(ClusterOptions::default()).await;
    let gw = c.gateway("g1").unwrap();
    // Direct from a client address (not a router's), no PROXY: refused before TLS.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let mut s = sock.connect(gw.client_addr).await.unwrap();
    s.write_all(&Preamble::Hello { key_id: 1 }.encode())
        .await
        .unwrap();
    let mut b = [0u8; 8];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(StatusReply::decode(&b).unwrap().status, Status::NoGateway);
    // A PROXY header from an address that is not a router's.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut s = sock.connect(gw.client_addr).await.unwrap();
    let header = jvpn_proto::proxy::ProxyHeader {
        addresses: Some(("10.1.2.3:4444".parse().unwrap(), gw.client_addr)),
        router_id: Some("r1".into()),
        view_id: None,
        intended_owner: None,
        takeover: false,
    }
    .encode()
    .unwrap();
    s.write_all(&header).await.unwrap();
    s.write_all(&Preamble::Hello { key_id: 1 }.encode())
        .await
        .unwrap();
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(StatusReply::decode(&b).unwrap().status, Status::BadPreamble);
    eventually(Duration::from_secs(5), "both refusals counted", || async {
        let m = gw.metrics().await.unwrap();
        let v = |r| {
            jvpn_loadtest::harness::metric_value(
                &m,
                "jvpn_gateway_connections_rejected_total",
                &[("reason", r)],
            )
        };
        v("direct_forbidden") == 1.0 && v("proxy_forbidden") == 1.0
    })
    .await
    .unwrap();
}

/// Issue 18 M2: a certified gateway whose cluster secret differs (same key
/// id) is refused before it becomes a member; the right secret is proven
/// both ways; a gateway one version older (no proof) still joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_another_cluster_secret_never_joins() {
    use jvpn_proto::keys::ClusterSecret;
    use jvpn_proto::membership_proof::{gateway_proof, verify_router_proof};
    let c = common::cluster(ClusterOptions::default()).await;
    let r = &c.routers[0];
    let l = &c.pki.layout;
    let g = Candidate::new(&c).await;
    let (ca, g4_id, own) = (g.ca.clone(), g.id(), g.own());
    let text = std::fs::read_to_string(l.secret()).unwrap();
    let right: ClusterSecret = text.trim().parse().unwrap();
    let right = right.derive();
    let wrong = ClusterSecret::new(right.key_id(), [0x5a; 32]).derive();
    let proven = |keys| HeartbeatRequest {
        secret_proof: gateway_proof(keys, "g4", 42, 1),
        incarnation_ordered: true,
        ..request("g4", &own, 1)
    };

    let refused = heartbeat(r.membership_addr, g4_id, &ca, proven(&wrong)).await;
    assert_refused_for_secret(r, refused).await;
    let known: Vec<String> = r.ring().await.unwrap()["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["node_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(known, ["g1", "g2", "g3"], "the wrong secret did not join");

    // The right secret: accepted, and the router proves it back.
    let reply = heartbeat(r.membership_addr, g4_id, &ca, proven(&right))
        .await
        .unwrap();
    let verifies = |keys| {
        verify_router_proof(
            keys,
            &reply.router_id,
            1,
            &reply.view_id,
            &reply.secret_proof,
        )
    };
    assert!(verifies(&right));
    assert!(
        !verifies(&wrong),
        "a gateway with another secret would see it"
    );

    // One version older: no proof sent, none received, still a member.
    let reply = heartbeat(r.membership_addr, g4_id, &ca, request("g4", &own, 1))
        .await
        .unwrap();
    assert!(reply.secret_proof.is_empty());
}

/// Issue 18 M3: strangers who fill the membership port's source table do
/// not keep a gateway out. The router learned the gateway's address from its
/// authenticated stream; when the gateway restarts after the flood arrived
/// (its source entry gone with its last connection), it still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_strangers_does_not_keep_a_restarted_gateway_out() {
    let mut c = common::cluster(ClusterOptions {
        gateways: 1,
        spare_gateways: 0,
        router_env: vec![("JVPN_ROUTER__MEMBERSHIP__MAX_SOURCES".into(), "8".into())],
        ..ClusterOptions::default()
    })
    .await;
    let port = c.routers[0].membership_addr;
    c.gateway("g1").unwrap().signal(Signal::SIGKILL).unwrap();
    c.wait_not_alive("g1", Duration::from_secs(10))
        .await
        .unwrap();
    // 40 strangers, each from its own loopback address, each holding a
    // plain TCP connection and opening another whenever the router closes
    // one (its TLS handshake deadline): 8 fill the table, a few share the
    // overflow allowance, the rest are refused, over and over.
    let strangers: Vec<_> = (2..42u8)
        .map(|i| {
            tokio::spawn(async move {
                loop {
                    let s = tokio::net::TcpSocket::new_v4().unwrap();
                    s.bind((std::net::Ipv4Addr::new(127, 0, 0, i), 0).into())
                        .unwrap();
                    if let Ok(mut conn) = s.connect(port).await {
                        let _ = conn.read(&mut [0; 64]).await;
                    }
                    // Pacing, not synchronisation: 40 refused strangers
                    // spinning would starve the 2-core machine.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    eventually(Duration::from_secs(5), "strangers refused", || async {
        c.routers[0]
            .metric("jvpn_router_membership_connections_refused_total", &[])
            .await
            .unwrap()
            > 0.0
    })
    .await
    .unwrap();
    c.start_gateway("g1").await.unwrap();
    c.wait_placeable(&["g1".to_owned()], Duration::from_secs(15))
        .await
        .unwrap();
    // The flood was still on while g1 got in.
    let refused = || async {
        c.routers[0]
            .metric("jvpn_router_membership_connections_refused_total", &[])
            .await
            .unwrap()
    };
    let then = refused().await;
    eventually(
        Duration::from_secs(10),
        "strangers still refused",
        || async { refused().await > then },
    )
    .await
    .unwrap();
    for s in strangers {
        s.abort();
    }
}

/// Once every gateway sends secret proofs, an operator can require them:
/// a heartbeat without one (a gateway one version older, or one that would
/// hide a wrong secret by sending none) is refused like a wrong proof.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_requires_secret_proofs_refuses_a_heartbeat_without_one() {
    let c = common::cluster(ClusterOptions {
        router_env: vec![(
            "JVPN_ROUTER__MEMBERSHIP__REQUIRE_SECRET_PROOF".into(),
            "true".into(),
        )],
        ..ClusterOptions::default()
    })
    .await;
    // Today's gateways prove the secret: they joined (LocalCluster::start
    // waited for all three to be placeable).
    let r = &c.routers[0];
    let g = Candidate::new(&c).await;
    let refused = heartbeat(r.membership_addr, g.id(), &g.ca, request("g4", &g.own(), 1)).await;
    assert_refused_for_secret(r, refused).await;
}

/// The heartbeat was refused for its secret proof, and counted (once).
async fn assert_refused_for_secret(
    r: &jvpn_loadtest::cluster::LocalRouter,
    refused: Result<HeartbeatReply, String>,
) {
    let e = refused.unwrap_err();
    assert!(
        e.contains("PermissionDenied") && e.contains("secret"),
        "{e}"
    );
    assert_eq!(
        r.metric(
            "jvpn_router_membership_refused_total",
            &[("reason", "secret")]
        )
        .await
        .unwrap(),
        1.0
    );
}

/// Issue 14, both sides of a rolling upgrade at the router: a gateway one
/// version older (no `known_view_id`) gets the members in every reply; one
/// that names the router's current view gets them left out, under the same
/// view id; naming any other view brings them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_members_travel_only_to_a_gateway_without_the_view() {
    let c = common::cluster(ClusterOptions::default()).await;
    let r = &c.routers[0];
    let g = Candidate::new(&c).await;
    let req = |seq: u64, known: Vec<u8>| HeartbeatRequest {
        sequence: seq,
        known_view_id: known,
        ..request("g4", &g.own(), 1)
    };
    let (tx, mut replies) = open_stream(r.membership_addr, g.id(), &g.ca, req(1, Vec::new()))
        .await
        .unwrap();
    let mut last = next_reply(&mut replies).await.unwrap();
    // As an older gateway: the members every time.
    for seq in 2..5 {
        tx.send(req(seq, Vec::new())).await.unwrap();
        let reply = next_reply(&mut replies).await.unwrap();
        assert!(
            !reply.members_omitted && !reply.members.is_empty(),
            "{reply:?}"
        );
        last = reply;
    }
    // Naming the view: left out while it is the router's view (g4 joining
    // may change it once or twice on the way).
    let mut omitted = 0;
    for seq in 5..25 {
        let known = last.view_id.clone();
        tx.send(req(seq, known.clone())).await.unwrap();
        let reply = next_reply(&mut replies).await.unwrap();
        if reply.view_id == known {
            assert!(
                reply.members_omitted && reply.members.is_empty(),
                "{reply:?}"
            );
            // What a steady cluster's reply costs, whatever its size.
            let bytes = prost::Message::encoded_len(&reply);
            assert!(bytes <= 128, "{bytes} bytes: {reply:?}");
            eprintln!("an unchanged view's reply: {bytes} bytes");
            omitted += 1;
        } else {
            // A whole view: this gateway did not say it takes deltas.
            assert!(
                !reply.members_omitted
                    && !reply.members.is_empty()
                    && reply.delta_base_view_id.is_empty(),
                "{reply:?}"
            );
            last = reply;
        }
    }
    assert!(omitted >= 10, "{omitted} replies left the members out");
    // Naming a view the router does not have: the members.
    tx.send(req(25, vec![0; 8])).await.unwrap();
    let reply = next_reply(&mut replies).await.unwrap();
    assert!(
        !reply.members_omitted && !reply.members.is_empty(),
        "{reply:?}"
    );
    let counted = c.routers[0]
        .metric("jvpn_router_heartbeat_views_omitted_total", &[])
        .await
        .unwrap();
    assert!(counted >= f64::from(omitted), "{counted}");
}

/// Issue 14: a gateway that takes deltas and holds the view before a
/// change gets only what changed: here g4 joining a cluster of three, as g4
/// sees it (one member added to the view it held), in a reply far smaller
/// than the view; the view it describes is the router's, checked by
/// rebuilding it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_holding_the_last_view_gets_only_the_change() {
    let c = common::cluster(ClusterOptions::default()).await;
    let r = &c.routers[0];
    let g = Candidate::new(&c).await;
    let keys = c.pki.cluster_keys().unwrap();
    let req = |seq: u64, known: Vec<u8>| HeartbeatRequest {
        sequence: seq,
        known_view_id: known,
        accepts_view_delta: true,
        incarnation_ordered: true,
        lease_ok: true,
        ..request("g4", &g.own(), 1)
    };
    let (tx, mut replies) = open_stream(r.membership_addr, g.id(), &g.ca, req(1, Vec::new()))
        .await
        .unwrap();
    let first = next_reply(&mut replies).await.unwrap();
    assert!(first.delta_base_view_id.is_empty(), "{first:?}");
    let base = jvpn_proto::ring::view_from_reply(&first, &keys)
        .unwrap()
        .unwrap();
    assert!(!base.contains(&"g4".parse().unwrap(), jvpn_proto::Incarnation(42)));
    // Heartbeats naming that view until g4 is placed (rise: two beats).
    let mut seq = 1;
    let delta = loop {
        seq += 1;
        assert!(seq < 40, "g4 never joined the view");
        tx.send(req(seq, base.id().0.to_vec())).await.unwrap();
        let reply = next_reply(&mut replies).await.unwrap();
        if reply.view_id != base.id().0 {
            break reply;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(delta.delta_base_view_id, base.id().0.to_vec(), "{delta:?}");
    assert_eq!(delta.members.len(), 1, "{delta:?}");
    assert_eq!(delta.members[0].node_id, "g4");
    assert!(delta.members_removed.is_empty(), "{delta:?}");
    let view = jvpn_proto::ring::view_from_delta(&base, &delta, &keys)
        .unwrap()
        .unwrap();
    assert_eq!(view.members().len(), base.members().len() + 1);
    let bytes = prost::Message::encoded_len(&delta);
    eprintln!("a one-member change: {bytes} bytes");
    assert!(bytes <= 256, "{bytes} bytes");
    let counted = r
        .metric("jvpn_router_heartbeat_view_deltas_total", &[])
        .await
        .unwrap();
    assert!(counted >= 1.0, "{counted}");
}
