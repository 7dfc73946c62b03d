#![allow(clippy::unwrap_used)]

use super::*;
use proptest::prelude::*;

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const GW: &str = "10.0.0.5:7443";
/// A listener the policy protects (data for the rules compiler: nothing
/// binds it).
const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9443);
/// A loopback destination the rules are checked against (policy data:
/// nothing binds or connects to it).
const LOOPBACK_DEST: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);

fn policy(rules: Vec<RuleConfig>) -> EgressPolicy {
    EgressPolicy::new(
        &EgressConfig {
            rules,
            ..EgressConfig::default()
        },
        &[a(GW), ADMIN],
        &[],
    )
    .unwrap()
}

fn rule(action: Action, principals: &[&str], cidrs: &[&str], ports: &[&str]) -> RuleConfig {
    RuleConfig {
        action,
        principals: principals.iter().map(|s| s.to_string()).collect(),
        cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
        ports: ports.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn the_default_allows_the_world_but_not_the_host_or_the_cluster() {
    let p = EgressPolicy::new(&EgressConfig::default(), &[a(GW)], &[]).unwrap();
    assert_eq!(p.check("alice", a("93.184.216.34:443")), Ok(()));
    assert_eq!(p.check("alice", a("[2001:db8::1]:22")), Ok(()));
    assert_eq!(
        p.check("alice", a("10.0.0.5:80")),
        Ok(()),
        "the gateway's host, another port"
    );
    for (dest, why) in [
        ("127.0.0.1:22", "loopback"),
        ("127.9.9.9:80", "loopback"),
        ("[::1]:22", "loopback"),
        ("[::ffff:127.0.0.1]:22", "loopback"),
        ("169.254.169.254:80", "link_local"),
        ("[fd20:ce::254]:80", "metadata"),
        ("[fe80::1]:80", "link_local"),
        ("224.0.0.251:5353", "multicast"),
        ("[ff02::1]:80", "multicast"),
        ("0.0.0.0:22", "unspecified"),
        ("[::]:22", "unspecified"),
        ("[::7f00:1]:22", "unspecified"),
        ("255.255.255.255:9", "unspecified"),
        ("[fd00:ec2::254]:80", "metadata"),
        ("100.100.100.200:80", "metadata"),
        ("168.63.129.16:80", "metadata"),
        ("[2002:7f00:1::]:80", "transition"),
        ("[64:ff9b:1::a00:5]:80", "transition"),
        // Well-known NAT64 is the IPv4 address it carries.
        ("[64:ff9b::7f00:1]:22", "loopback"),
        ("[64:ff9b::a9fe:a9fe]:80", "link_local"),
        (GW, "cluster_listener"),
    ] {
        assert_eq!(
            p.check("alice", a(dest)).map_err(Denial::as_str),
            Err(why),
            "{dest}"
        );
    }
}

#[test]
fn a_protected_range_opens_only_to_a_rule_that_names_it() {
    let p = policy(vec![
        rule(Action::Allow, &["dev"], &["127.0.0.0/8"], &["1-65535"]),
        rule(Action::Allow, &["*"], &["0.0.0.0/0"], &["1-65535"]),
    ]);
    assert_eq!(p.check("dev", LOOPBACK_DEST), Ok(()));
    assert_eq!(
        p.check("ops", LOOPBACK_DEST),
        Err(Denial::Protected(Protected::Loopback)),
        "0.0.0.0/0 does not name loopback"
    );
    // The gateway's own admin listener on loopback needs its very host.
    assert_eq!(
        p.check("dev", ADMIN),
        Err(Denial::Protected(Protected::ClusterListener))
    );
    let q = policy(vec![rule(
        Action::Allow,
        &["dev"],
        &["127.0.0.1/32"],
        &["9443"],
    )]);
    assert_eq!(q.check("dev", ADMIN), Ok(()));
}

/// Review finding: a deny rule placed first must cover protected addresses
/// too (it only narrows), or a later allow that names them would win.
#[test]
fn a_deny_rule_first_covers_protected_addresses_too() {
    let p = policy(vec![
        rule(Action::Deny, &["bob"], &["0.0.0.0/0"], &["1-65535"]),
        rule(Action::Allow, &["*"], &["169.254.169.254/32"], &["80"]),
    ]);
    assert_eq!(p.check("bob", a("169.254.169.254:80")), Err(Denial::Rule));
    assert_eq!(p.check("alice", a("169.254.169.254:80")), Ok(()));
}

/// Review finding: a listener on a wildcard address answers on every
/// address of the host, not only loopback.
#[test]
fn a_wildcard_listener_is_protected_on_every_host_address() {
    let host = ["10.0.0.5".parse().unwrap(), "2001:db8::5".parse().unwrap()];
    let p = EgressPolicy::new(
        &EgressConfig::default(),
        &[a("0.0.0.0:7443"), a("[::]:9443")],
        &host,
    )
    .unwrap();
    for dest in [
        "10.0.0.5:7443",
        "[2001:db8::5]:9443",
        "10.0.0.5:9443",
        "0.0.0.0:7443",
    ] {
        assert!(p.check("alice", a(dest)).is_err(), "{dest}");
    }
    assert_eq!(
        p.check("alice", a("10.0.0.5:7443")),
        Err(Denial::Protected(Protected::ClusterListener))
    );
    assert_eq!(p.check("alice", a("10.0.0.6:7443")), Ok(()), "another host");
}

/// Review finding: the host's addresses were known only as they were
/// when the policy was made (an address added later, or a `getifaddrs`
/// that failed at a reload, left a wildcard listener's port open). The
/// host's addresses are read again at check time too.
#[test]
fn a_host_address_the_policy_was_not_told_of_is_still_the_hosts() {
    let mine = nix::ifaddrs::getifaddrs()
        .unwrap()
        .filter_map(|i| Some(i.address?.as_sockaddr_in()?.ip()))
        .find(|ip| !ip.is_loopback() && !ip.is_link_local())
        .expect("this test needs a non-loopback, non-link-local IPv4 address on the host");
    let p = EgressPolicy::new(&EgressConfig::default(), &[a("0.0.0.0:7443")], &[]).unwrap();
    assert_eq!(
        p.check("alice", SocketAddr::from((mine, 7443))),
        Err(Denial::Protected(Protected::ClusterListener)),
        "{mine}"
    );
    assert_eq!(p.check("alice", SocketAddr::from((mine, 7444))), Ok(()));
}

#[test]
fn first_match_wins_and_no_match_refuses() {
    let p = policy(vec![
        rule(Action::Deny, &["*"], &["192.0.2.0/24"], &["22"]),
        rule(
            Action::Allow,
            &["alice", "bob"],
            &["192.0.2.0/24"],
            &["22", "8000-8100"],
        ),
    ]);
    assert_eq!(p.check("alice", a("192.0.2.7:22")), Err(Denial::Rule));
    assert_eq!(p.check("alice", a("192.0.2.7:8050")), Ok(()));
    assert_eq!(p.check("alice", a("192.0.2.7:8101")), Err(Denial::NoRule));
    assert_eq!(p.check("carol", a("192.0.2.7:8050")), Err(Denial::NoRule));
    assert_eq!(p.check("bob", a("198.51.100.1:8050")), Err(Denial::NoRule));
}

#[test]
fn the_gateways_stream_limit_defaults_to_half_the_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit};
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let p = EgressPolicy::new(&EgressConfig::default(), &[], &[]).unwrap();
    assert_eq!(p.max_streams as u64, (soft / 2).max(1));
    let set = EgressConfig {
        max_streams: 7,
        ..EgressConfig::default()
    };
    assert_eq!(EgressPolicy::new(&set, &[], &[]).unwrap().max_streams, 7);
}

#[test]
fn bad_rules_name_their_key() {
    let bad = EgressConfig {
        rules: vec![
            rule(Action::Allow, &["*"], &["10.0.0.1/8"], &["443"]),
            rule(
                Action::Allow,
                &["*"],
                &["10.0.0.0/33", "nonsense"],
                &["0", "90-80"],
            ),
            rule(Action::Allow, &[], &[], &["1"]),
            // No ports: a deny rule like this would never match.
            rule(Action::Deny, &["*"], &["10.0.0.0/8"], &[]),
            // The IPv4 block these carry needs the IPv6 prefix's last 32
            // bits: /32 is not 0.0.0.0/32.
            rule(
                Action::Allow,
                &["*"],
                &["64:ff9b::/32", "::ffff:0:0/95"],
                &["1"],
            ),
        ],
        connect_timeout_ms: 0,
        max_streams_per_session: 0,
        max_streams: 0,
        max_streams_per_principal: 0,
        window_bytes: 1024,
        principal_bytes_per_s: 1000,
        principal_burst_bytes: 10,
        limits: Vec::new(),
    };
    let errs = EgressPolicy::new(&bad, &[], &[]).unwrap_err();
    let keys: Vec<(&str, &str)> = errs
        .iter()
        .map(|e| (e.key.as_str(), e.problem.as_str()))
        .collect();
    let has = |k: &str, what: &str| keys.iter().any(|(key, p)| *key == k && p.contains(what));
    assert!(has("egress.rules[0].cidrs", "host bits"), "{keys:?}");
    assert!(has("egress.rules[1].cidrs", "prefix length"), "{keys:?}");
    assert!(has("egress.rules[1].cidrs", "not an address"), "{keys:?}");
    assert!(has("egress.rules[1].ports", "1..=65535"), "{keys:?}");
    assert!(has("egress.rules[1].ports", "backwards"), "{keys:?}");
    assert!(has("egress.rules[2].cidrs", "at least one"), "{keys:?}");
    assert!(has("egress.rules[3].ports", "at least one"), "{keys:?}");
    let nat64 = keys
        .iter()
        .filter(|(k, p)| *k == "egress.rules[4].cidrs" && p.contains("/96"))
        .count();
    assert_eq!(nat64, 2, "{keys:?}");
    assert!(has("egress.connect_timeout_ms", "zero"), "{keys:?}");
    assert!(
        has("egress.max_streams_per_session", "0 is outside"),
        "{keys:?}"
    );
    let too_many = EgressConfig {
        max_streams_per_session: MAX_STREAMS_CEILING + 1,
        ..EgressConfig::default()
    };
    let errs = EgressPolicy::new(&too_many, &[], &[]).unwrap_err();
    assert_eq!(errs[0].key, "egress.max_streams_per_session", "{errs:?}");
    assert!(has("egress.window_bytes", "outside"), "{keys:?}");
    assert!(has("egress.principal_burst_bytes", "at least"), "{keys:?}");
    assert!(
        has("egress.rules[2].principals", "at least one"),
        "{keys:?}"
    );
}

fn protected_addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|x| IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | (x & 0x00ff_ffff)))),
        any::<u16>().prop_map(|x| IpAddr::V4(Ipv4Addr::from(0xa9fe_0000 | u32::from(x)))),
        any::<u32>().prop_map(|x| IpAddr::V4(Ipv4Addr::from(0xe000_0000 | (x & 0x0fff_ffff)))),
        any::<u32>().prop_map(|x| IpAddr::V4(Ipv4Addr::from(x & 0x00ff_ffff))),
        any::<u128>().prop_map(|x| IpAddr::V6(Ipv6Addr::from(0xfe80u128 << 112 | (x >> 10)))),
        any::<u128>().prop_map(|x| IpAddr::V6(Ipv6Addr::from(0xffu128 << 120 | (x >> 8)))),
        any::<u32>().prop_map(|x| IpAddr::V6(Ipv6Addr::from(u128::from(x)))),
        // The same, IPv4-mapped.
        any::<u32>().prop_map(|x| IpAddr::V6(
            Ipv4Addr::from(0x7f00_0000 | (x & 0xffffff)).to_ipv6_mapped()
        )),
    ]
}

proptest! {
    /// However broad the allow rules, a protected destination stays closed
    /// unless a rule names its range.
    #[test]
    fn broad_rules_never_open_a_protected_range(
        ip in protected_addr(),
        port in 1u16..,
        v4_len in 0u8..=3,
        v6_len in 0u8..=7,
    ) {
        let broad_v4 = Cidr::from_parts(IpAddr::V4(Ipv4Addr::UNSPECIFIED), v4_len).to_string_for_test();
        let broad_v6 = Cidr::from_parts(IpAddr::V6(Ipv6Addr::UNSPECIFIED), v6_len).to_string_for_test();
        let p = policy(vec![rule(Action::Allow, &["*"], &[&broad_v4, &broad_v6], &["1-65535"])]);
        let r = p.check("anyone", SocketAddr::new(ip, port));
        prop_assert!(matches!(r, Err(Denial::Protected(_))), "{} {:?}", ip, r);
    }
}

#[test]
fn the_bucket_moves_bytes_at_its_rate_after_the_burst() {
    use std::time::{Duration, Instant};
    let b = Bucket::new(1_000);
    let t0 = Instant::now();
    // The burst goes at once.
    assert_eq!(b.take(1_000, 10_000, 1_000, t0), Duration::ZERO);
    // Then 5,000 bytes at 10,000/s: half a second of debt.
    let w = b.take(5_000, 10_000, 1_000, t0);
    assert_eq!(w, Duration::from_millis(500));
    // A second taker queues behind the first.
    let w = b.take(1_000, 10_000, 1_000, t0);
    assert_eq!(w, Duration::from_millis(600));
    // Time pays the debt; the bucket never holds more than its depth.
    let later = t0 + Duration::from_secs(10);
    assert_eq!(b.take(1_000, 10_000, 1_000, later), Duration::ZERO);
    assert!(b.take(1, 10_000, 1_000, later) > Duration::ZERO);
}

/// Issue 15: the other members' listeners (from membership) are the
/// cluster's too: refused even under an allow-everything rule, open only
/// to a rule that names the host; other ports of that host stay open.
#[test]
fn the_other_members_listeners_are_protected_like_this_gateways() {
    let cluster = [
        a("10.0.0.6:7443"),
        a("[2001:db8::7]:7443"),
        a("10.0.0.9:7100"),
    ];
    let p = EgressPolicy::new(&EgressConfig::default(), &[a(GW)], &[]).unwrap();
    for dest in ["10.0.0.6:7443", "[2001:db8::7]:7443", "10.0.0.9:7100"] {
        assert_eq!(
            p.check_with("alice", a(dest), &[&cluster]),
            Err(Denial::Protected(Protected::ClusterListener)),
            "{dest}"
        );
        // Without membership's list, the same address is just the world.
        assert_eq!(p.check("alice", a(dest)), Ok(()), "{dest}");
    }
    // An IPv4 member reached through its IPv4-mapped IPv6 form.
    assert!(
        p.check_with("alice", a("[::ffff:10.0.0.6]:7443"), &[&cluster])
            .is_err()
    );
    assert_eq!(
        p.check_with("alice", a("10.0.0.6:443"), &[&cluster]),
        Ok(())
    );
    let wide = policy(vec![rule(
        Action::Allow,
        &["*"],
        &["0.0.0.0/0"],
        &["1-65535"],
    )]);
    assert_eq!(
        wide.check_with("alice", a("10.0.0.6:7443"), &[&cluster]),
        Err(Denial::Protected(Protected::ClusterListener))
    );
    let named = policy(vec![rule(
        Action::Allow,
        &["ops"],
        &["10.0.0.6/32"],
        &["7443"],
    )]);
    assert_eq!(
        named.check_with("ops", a("10.0.0.6:7443"), &[&cluster]),
        Ok(())
    );
}

#[test]
fn an_ipv4_block_written_as_ipv6_is_the_ipv4_block() {
    let as_v4 = |s: &str| s.parse::<Cidr>().map(Cidr::to_string_for_test);
    assert_eq!(as_v4("::ffff:10.0.0.0/104").as_deref(), Ok("10.0.0.0/8"));
    assert_eq!(as_v4("64:ff9b::a00:0/104").as_deref(), Ok("10.0.0.0/8"));
    assert_eq!(as_v4("::ffff:0:0/96").as_deref(), Ok("0.0.0.0/0"));
    assert_eq!(as_v4("::ffff:10.0.0.1").as_deref(), Ok("10.0.0.1/32"));
    assert!(as_v4("::ffff:10.0.0.1/104").is_err(), "host bits");
    // A block that reaches beyond the mapped range is not an IPv4 block.
    assert!(as_v4("64:ff9b::/32").is_err());
    // And such a rule opens nothing: the unspecified address stays shut.
    let p = EgressPolicy::new(
        &EgressConfig {
            rules: vec![rule(Action::Allow, &["*"], &["64:ff9b::/32"], &["22"])],
            ..EgressConfig::default()
        },
        &[],
        &[],
    );
    assert!(p.is_err());
}

fn limits_entry(principals: &[&str]) -> LimitsConfig {
    LimitsConfig {
        principals: principals.iter().map(|s| s.to_string()).collect(),
        ..LimitsConfig::default()
    }
}

/// `[[egress.limits]]` gives the principals it names limits of their own;
/// what an entry leaves out, and every other principal, keeps `[egress]`'s.
#[test]
fn a_principals_limits_entry_overrides_the_egress_values() {
    use std::time::Duration;
    let cfg = EgressConfig {
        max_streams_per_principal: 10,
        principal_bytes_per_s: 1000,
        principal_burst_bytes: 32_768,
        connect_timeout_ms: 5000,
        limits: vec![
            LimitsConfig {
                max_streams: Some(2),
                bytes_per_s: Some(0),
                ..limits_entry(&["alice", "bob"])
            },
            LimitsConfig {
                connect_timeout_ms: Some(300),
                burst_bytes: Some(65_536),
                ..limits_entry(&["carol"])
            },
            LimitsConfig {
                max_streams: Some(0),
                ..limits_entry(&["dave"])
            },
        ],
        ..EgressConfig::default()
    };
    let p = EgressPolicy::new(&cfg, &[], &[]).unwrap();
    let own = |max_streams, rate, ms| Limits {
        max_streams,
        rate,
        connect_timeout: Duration::from_millis(ms),
    };
    assert_eq!(p.limits("alice"), &own(2, None, 5000));
    assert_eq!(p.limits("bob"), &own(2, None, 5000));
    assert_eq!(p.limits("carol"), &own(10, Some((1000, 65_536)), 300));
    assert_eq!(
        p.limits("dave"),
        &own(usize::MAX, Some((1000, 32_768)), 5000)
    );
    assert_eq!(p.limits("erin"), &own(10, Some((1000, 32_768)), 5000));
    // Without entries every principal has [egress]'s, 0 meaning none.
    let plain = EgressPolicy::new(&EgressConfig::default(), &[], &[]).unwrap();
    assert_eq!(plain.limits("alice"), &own(usize::MAX, None, 10_000));
}

#[test]
fn bad_limits_entries_name_their_key() {
    let streams = |names: &[&str]| LimitsConfig {
        max_streams: Some(1),
        ..limits_entry(names)
    };
    let bad = EgressConfig {
        limits: vec![
            streams(&[]),
            streams(&["*"]),
            streams(&["alice"]),
            LimitsConfig {
                connect_timeout_ms: Some(0),
                bytes_per_s: Some(1000),
                burst_bytes: Some(10),
                ..limits_entry(&["alice"])
            },
            streams(&["", "bob", "bob"]),
            // Nothing set: a mistake, not a no-op.
            limits_entry(&["carol"]),
        ],
        ..EgressConfig::default()
    };
    let errs = EgressPolicy::new(&bad, &[], &[]).unwrap_err();
    let has = |k: &str, what: &str| errs.iter().any(|e| e.key == k && e.problem.contains(what));
    assert!(
        has("egress.limits[0].principals", "at least one"),
        "{errs:?}"
    );
    assert!(
        has("egress.limits[1].principals", "every principal"),
        "{errs:?}"
    );
    assert!(
        has("egress.limits[3].principals", "egress.limits[2]"),
        "{errs:?}"
    );
    assert!(
        has("egress.limits[3].connect_timeout_ms", "zero"),
        "{errs:?}"
    );
    assert!(has("egress.limits[3].burst_bytes", "16384"), "{errs:?}");
    assert!(has("egress.limits[4].principals", "empty name"), "{errs:?}");
    assert!(
        has("egress.limits[4].principals", "\"bob\" is named twice"),
        "{errs:?}"
    );
    assert!(has("egress.limits[5]", "sets none"), "{errs:?}");
    assert_eq!(errs.len(), 8, "{errs:?}");
    // A rate set in [egress] needs the entry's burst to be big enough too.
    let inherited = EgressConfig {
        principal_bytes_per_s: 1000,
        limits: vec![LimitsConfig {
            burst_bytes: Some(100),
            ..limits_entry(&["alice"])
        }],
        ..EgressConfig::default()
    };
    let errs = EgressPolicy::new(&inherited, &[], &[]).unwrap_err();
    assert_eq!(errs[0].key, "egress.limits[0].burst_bytes", "{errs:?}");
    // [egress]'s own small burst is said once, at its own key.
    let small = EgressConfig {
        principal_bytes_per_s: 1000,
        principal_burst_bytes: 100,
        limits: vec![streams(&["alice"])],
        ..EgressConfig::default()
    };
    let errs = EgressPolicy::new(&small, &[], &[]).unwrap_err();
    let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["egress.principal_burst_bytes"], "{errs:?}");
}
