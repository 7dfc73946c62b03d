//! The gateway's own admission rules as pure functions: what to do with a
//! connection's first bytes before any TLS work, and whether a HELLO may
//! mint a session now. Sans-IO like the engine: no sockets, and `now` is an
//! argument. The shell (`server::conn`, `server::session`) reads the bytes,
//! calls these, and writes what they decide.
//!
//! Pre-TLS, in order:
//! 1. PROXY v2 only from configured routers ([`Gate::from_router`]); a
//!    router's connection must start with one ([`Gate::proxy`]: `LOCAL` is
//!    a health check, anything else names the client and intended owner).
//! 2. A PROXY signature from anyone else: `bad_preamble` (`proxy_forbidden`).
//! 3. In cluster mode, an agent that came straight here: `no_gateway`
//!    (`direct_forbidden`) unless `cluster.direct_clients`.
//! 4. A router aiming at another life of this node id: `owner_lost`.
//! 5. A preamble that does not decode: its own status (`bad_preamble`).
//! 6. The handshake budget (RESUMEs keep their reserved share): `overloaded`
//!    with the time until a token frees.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use jvpn_proto::preamble::{PREAMBLE_LEN, Preamble, Status};
use jvpn_proto::proxy::ProxyHeader;
use jvpn_proto::ring::Ring;
use jvpn_proto::{Incarnation, Mono, NodeId};
use jvpn_runtime::admission::{HandshakeBudget, HandshakeKind};

use crate::membership::Cluster;
use crate::metrics::ConnReject;

/// Who this gateway is, and whom it takes connections from.
#[derive(Clone, Debug)]
pub struct Gate {
    pub node_id: NodeId,
    pub incarnation: Incarnation,
    /// Router source addresses; empty: single-node mode.
    pub routers: Vec<IpAddr>,
    /// In cluster mode, agents may also connect directly.
    pub direct_clients: bool,
}

/// A connection refused before TLS: the status reply to send and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Counted in `connections_rejected_total{reason}`.
    pub reject: ConnReject,
    /// Sent in the 8-byte status reply.
    pub status: Status,
    /// `retry_after` in the status reply.
    pub retry: Duration,
    /// `rate_limited_total{stage}` when a limit refused it.
    pub rate_limit_stage: Option<&'static str>,
}

impl Refusal {
    fn new(reject: ConnReject, status: Status) -> Self {
        Self {
            reject,
            status,
            retry: Duration::ZERO,
            rate_limit_stage: None,
        }
    }
}

/// What a router's PROXY header says about the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forwarded {
    /// `LOCAL`: the router checks that we answer; no session follows.
    HealthCheck,
    /// A client's connection.
    Client {
        /// The client's address (limits and logs use it, not the router's).
        source: Option<SocketAddr>,
        /// For a RESUME, the owner the router routed to.
        intended: Option<(NodeId, Incarnation)>,
        /// The forwarding router (HELLO fencing needs a lease with it).
        router_id: Option<String>,
        /// Topology 3: the router found this RESUME's owner dead and asks
        /// this gateway (the session's shard owner) to claim it.
        takeover: bool,
    },
}

/// A preamble the gate let through to the TLS handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub preamble: Preamble,
    pub kind: HandshakeKind,
}

impl Gate {
    /// True when `ip` is a configured router: it must send a PROXY header.
    /// IPv4-mapped IPv6 (a listener on `[::]`) is the IPv4 address it maps.
    pub fn from_router(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.routers.iter().any(|r| r.to_canonical() == ip)
    }

    /// Rule 1 for a router's connection: `header` is what it began with
    /// (`None`: not a PROXY header at all).
    pub fn proxy(&self, header: Option<ProxyHeader>) -> Result<Forwarded, Refusal> {
        match header {
            None => Err(Refusal::new(ConnReject::ProxyRequired, Status::BadPreamble)),
            Some(h) if h.is_local() => Ok(Forwarded::HealthCheck),
            Some(h) => Ok(Forwarded::Client {
                source: h
                    .source()
                    .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port())),
                intended: h.intended_owner,
                router_id: h.router_id,
                takeover: h.takeover,
            }),
        }
    }

    /// Rules 2–6 above on the 64 preamble bytes. `intended` is the owner a
    /// router's PROXY header named, if any. Takes a budget token when it
    /// admits.
    pub fn preamble(
        &self,
        from_router: bool,
        intended: Option<&(NodeId, Incarnation)>,
        bytes: &[u8; PREAMBLE_LEN],
        budget: &mut HandshakeBudget,
        now: Mono,
    ) -> Result<Admitted, Refusal> {
        if bytes.starts_with(jvpn_proto::proxy::SIGNATURE) {
            return Err(Refusal::new(
                ConnReject::ProxyForbidden,
                Status::BadPreamble,
            ));
        }
        let cluster = !self.routers.is_empty();
        if cluster && !from_router && !self.direct_clients {
            return Err(Refusal::new(ConnReject::DirectForbidden, Status::NoGateway));
        }
        if let Some((node, inc)) = intended
            && (*node != self.node_id || *inc != self.incarnation)
        {
            // The router aimed at another life of this node: its sessions are gone.
            return Err(Refusal::new(ConnReject::OwnerLost, Status::OwnerLost));
        }
        let preamble = Preamble::decode(bytes)
            .map_err(|e| Refusal::new(ConnReject::BadPreamble, e.status()))?;
        let kind = match preamble {
            Preamble::Hello { .. } => HandshakeKind::Hello,
            Preamble::Resume { .. } => HandshakeKind::Resume,
        };
        if let Err(retry) = budget.take(kind, now) {
            return Err(Refusal {
                retry,
                rate_limit_stage: Some("handshake_budget"),
                ..Refusal::new(ConnReject::Overloaded, Status::Overloaded)
            });
        }
        Ok(Admitted { preamble, kind })
    }
}

/// HELLO fencing: no lease, no new session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoLease;

/// The ring a HELLO may mint its session in at `now`: `Ok(None)` without
/// membership (single node, static PROXY); with it, the forwarding router's
/// ring under a valid lease with that router, or for a direct HELLO the
/// ring of a majority of leased routers.
pub fn hello_placement(
    cluster: Option<&Cluster>,
    router_id: Option<&str>,
    now: Mono,
) -> Result<Option<Arc<Ring>>, NoLease> {
    let Some(c) = cluster else {
        return Ok(None);
    };
    let ring = match router_id {
        Some(r) => c.hello_ring(r, now),
        None => c.majority_ring(now),
    };
    ring.map(Some).ok_or(NoLease)
}

/// The lease check repeated right before `HelloOk` is written: the lease
/// may have lapsed while the session was minted.
pub fn hello_lease_holds(cluster: Option<&Cluster>, router_id: Option<&str>, now: Mono) -> bool {
    match (cluster, router_id) {
        (None, _) => true,
        (Some(c), Some(r)) => c.lease_with(r, now),
        (Some(c), None) => c.has_majority_lease(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jvpn_proto::keys::ClusterSecret;
    use jvpn_proto::ring::{RingParams, View};

    fn node(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn gate(routers: &[&str], direct_clients: bool) -> Gate {
        Gate {
            node_id: node("g1"),
            incarnation: Incarnation(7),
            routers: routers.iter().map(|r| r.parse().unwrap()).collect(),
            direct_clients,
        }
    }

    fn hello() -> [u8; PREAMBLE_LEN] {
        Preamble::Hello { key_id: 1 }.encode()
    }

    fn empty_ring(keys: &jvpn_proto::keys::ClusterKeys) -> Arc<Ring> {
        let view = View::new(Vec::new(), RingParams::default(), keys).unwrap();
        Arc::new(Ring::new(view, keys))
    }

    fn budget() -> HandshakeBudget {
        HandshakeBudget::new(1000.0, 0.5, Mono::ZERO)
    }

    #[test]
    fn only_configured_routers_are_routers() {
        let g = gate(&["10.0.0.1"], false);
        assert!(g.from_router("10.0.0.1".parse().unwrap()));
        assert!(!g.from_router("10.0.0.2".parse().unwrap()));
        assert!(!gate(&[], false).from_router("10.0.0.1".parse().unwrap()));
    }

    /// Issue 18 L3: a gateway listening on `[::]` sees a router's IPv4
    /// connection as `::ffff:a.b.c.d`; it is still that router. A PROXY
    /// source in mapped form is the IPv4 client.
    #[test]
    fn mapped_addresses_are_the_ipv4_they_map() {
        let g = gate(&["10.0.0.1"], false);
        assert!(g.from_router("::ffff:10.0.0.1".parse().unwrap()));
        let mapped = Gate {
            routers: vec!["::ffff:10.0.0.1".parse().unwrap()],
            ..gate(&[], false)
        };
        assert!(mapped.from_router("10.0.0.1".parse().unwrap()));
        let h = ProxyHeader {
            addresses: Some((
                "[::ffff:198.51.100.7]:40000".parse().unwrap(),
                "[::ffff:10.0.0.9]:7443".parse().unwrap(),
            )),
            ..ProxyHeader::default()
        };
        let Ok(Forwarded::Client { source, .. }) = g.proxy(Some(h)) else {
            panic!("a client connection")
        };
        assert_eq!(source, Some("198.51.100.7:40000".parse().unwrap()));
    }

    #[test]
    fn a_router_must_send_proxy_and_local_is_a_health_check() {
        let g = gate(&["10.0.0.1"], false);
        let r = g.proxy(None).unwrap_err();
        assert_eq!(
            (r.reject, r.status),
            (ConnReject::ProxyRequired, Status::BadPreamble)
        );
        assert_eq!(
            g.proxy(Some(ProxyHeader::local())),
            Ok(Forwarded::HealthCheck)
        );
        let client: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let h = ProxyHeader {
            addresses: Some((client, "10.0.0.9:7443".parse().unwrap())),
            router_id: Some("r1".into()),
            view_id: None,
            intended_owner: Some((node("g1"), Incarnation(7))),
            takeover: true,
        };
        assert_eq!(
            g.proxy(Some(h)),
            Ok(Forwarded::Client {
                source: Some(client),
                intended: Some((node("g1"), Incarnation(7))),
                router_id: Some("r1".into()),
                takeover: true,
            })
        );
    }

    #[test]
    fn a_proxy_header_from_a_client_is_forbidden() {
        let mut bytes = [0u8; PREAMBLE_LEN];
        bytes[..12].copy_from_slice(jvpn_proto::proxy::SIGNATURE);
        let r = gate(&[], false)
            .preamble(false, None, &bytes, &mut budget(), Mono::ZERO)
            .unwrap_err();
        assert_eq!(r.reject, ConnReject::ProxyForbidden);
        assert_eq!(r.status, Status::BadPreamble);
    }

    #[test]
    fn direct_clients_are_refused_in_cluster_mode_unless_allowed() {
        let r = gate(&["10.0.0.1"], false)
            .preamble(false, None, &hello(), &mut budget(), Mono::ZERO)
            .unwrap_err();
        assert_eq!(
            (r.reject, r.status),
            (ConnReject::DirectForbidden, Status::NoGateway)
        );
        let ok =
            gate(&["10.0.0.1"], true).preamble(false, None, &hello(), &mut budget(), Mono::ZERO);
        assert_eq!(ok.unwrap().kind, HandshakeKind::Hello);
        // Single node: everyone is direct.
        assert!(
            gate(&[], false)
                .preamble(false, None, &hello(), &mut budget(), Mono::ZERO)
                .is_ok()
        );
    }

    #[test]
    fn another_life_of_this_node_is_owner_lost() {
        let g = gate(&["10.0.0.1"], false);
        for intended in [(node("g1"), Incarnation(6)), (node("g2"), Incarnation(7))] {
            let r = g
                .preamble(true, Some(&intended), &hello(), &mut budget(), Mono::ZERO)
                .unwrap_err();
            assert_eq!(
                (r.reject, r.status),
                (ConnReject::OwnerLost, Status::OwnerLost)
            );
        }
        let me = (node("g1"), Incarnation(7));
        assert!(
            g.preamble(true, Some(&me), &hello(), &mut budget(), Mono::ZERO)
                .is_ok()
        );
    }

    #[test]
    fn an_undecodable_preamble_gets_its_own_status() {
        let mut bytes = hello();
        bytes[0] ^= 0xff;
        let r = gate(&[], false)
            .preamble(false, None, &bytes, &mut budget(), Mono::ZERO)
            .unwrap_err();
        assert_eq!(r.reject, ConnReject::BadPreamble);
        assert_eq!(r.status, Status::BadPreamble);
    }

    #[test]
    fn an_exhausted_budget_is_overloaded_with_a_retry_hint_until_it_refills() {
        let g = gate(&[], false);
        // 2 handshakes/s, half reserved for RESUMEs: one HELLO per second.
        let mut b = HandshakeBudget::new(2.0, 0.5, Mono::ZERO);
        let mut admitted = 0;
        let refusal = loop {
            match g.preamble(false, None, &hello(), &mut b, Mono::ZERO) {
                Ok(_) => admitted += 1,
                Err(r) => break r,
            }
            assert!(admitted < 100, "the budget never ran out");
        };
        assert_eq!(refusal.reject, ConnReject::Overloaded);
        assert_eq!(refusal.status, Status::Overloaded);
        assert_eq!(refusal.rate_limit_stage, Some("handshake_budget"));
        assert!(refusal.retry > Duration::ZERO);
        let later = Mono::ZERO + refusal.retry + Duration::from_millis(1);
        assert!(g.preamble(false, None, &hello(), &mut b, later).is_ok());
    }

    #[test]
    fn hello_fencing_follows_the_lease_on_the_given_clock() {
        assert!(matches!(
            hello_placement(None, Some("r1"), Mono::ZERO),
            Ok(None)
        ));
        assert!(hello_lease_holds(None, None, Mono::ZERO));

        let keys = "1:".to_owned() + &"ab".repeat(32);
        let keys = keys.parse::<ClusterSecret>().unwrap().derive();
        let c = Cluster::new(
            node("g1"),
            Incarnation(7),
            &["a:1".into(), "b:1".into(), "c:1".into()],
            Duration::from_millis(750),
            Duration::from_secs(60),
            keys.clone(),
            std::time::Instant::now(),
        );
        let ring = empty_ring(&keys);
        let until = Mono::from_millis(1_000);
        c.grant_for_test(0, "r1", ring, until);
        let before = Mono::from_millis(999);
        assert!(
            hello_placement(Some(&c), Some("r1"), before)
                .unwrap()
                .is_some()
        );
        assert!(hello_lease_holds(Some(&c), Some("r1"), before));
        // Another router, or the same one once its lease ended: no minting.
        assert!(matches!(
            hello_placement(Some(&c), Some("r2"), before),
            Err(NoLease)
        ));
        assert!(matches!(
            hello_placement(Some(&c), Some("r1"), until),
            Err(NoLease)
        ));
        assert!(!hello_lease_holds(Some(&c), Some("r1"), until));
        // Direct HELLO: one lease of three is no majority; two are.
        assert!(matches!(
            hello_placement(Some(&c), None, before),
            Err(NoLease)
        ));
        assert!(!hello_lease_holds(Some(&c), None, before));
        let ring = empty_ring(&keys);
        c.grant_for_test(1, "r2", ring, until);
        assert!(hello_placement(Some(&c), None, before).unwrap().is_some());
        assert!(hello_lease_holds(Some(&c), None, before));
    }
}
