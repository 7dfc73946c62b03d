//! `jvpn-gateway check`: full validation without binding, naming every bad
//! key; environment overrides beat the file, which beats the defaults.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use jvpn_gateway::config;
use jvpn_gateway::pki::{PkiSpec, init};

fn pki(dir: &Path) -> jvpn_gateway::pki::PkiLayout {
    init(&PkiSpec {
        out: dir.join("pki"),
        cluster: "jvpn-dev".into(),
        nodes: vec!["g1".into()],
        routers: vec![],
        agents: 1,
    })
    .unwrap()
}

fn base(l: &jvpn_gateway::pki::PkiLayout) -> String {
    format!(
        "node_id = \"g1\"\nclient_addr = \"127.0.0.1:0\"\nadmin_addr = \"127.0.0.1:0\"\n\
         [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nagent_ca_file = \"{}\"\n\
         [cluster]\nsecret_file = \"{}\"\n",
        l.gateway_cert("g1").display(),
        l.gateway_key("g1").display(),
        l.agent_ca().display(),
        l.secret().display()
    )
}

fn check(dir: &Path, text: &str) -> (i32, String) {
    let path = dir.join("gw.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_jvpn-gateway"))
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("JVPN_GATEWAY__POLICY__SWITCH_COOLDOWN_MS")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_good_config_passes() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let (code, err) = check(d.path(), &base(&l));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn an_unknown_key_is_named() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let (code, err) = check(
        d.path(),
        &format!("{}[policy]\nswitch_cooldwn_ms = 5\n", base(&l)),
    );
    assert_eq!(code, 64);
    assert!(err.contains("switch_cooldwn_ms"), "{err}");
}

#[test]
fn an_egress_rule_that_opens_more_than_it_says_is_named() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let rules = "[[egress.rules]]\naction = \"allow\"\ncidrs = [\"10.0.0.1/8\"]\n";
    let (code, err) = check(d.path(), &format!("{}{rules}", base(&l)));
    assert_eq!(code, 64);
    assert!(
        err.contains("egress.rules[0].cidrs") && err.contains("host bits"),
        "{err}"
    );
    let (code, err) = check(
        d.path(),
        &format!("{}{}", base(&l), rules.replace("10.0.0.1/8", "10.0.0.0/8")),
    );
    assert_eq!(code, 0, "{err}");
}

#[test]
fn zero_durations_are_named_each() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let text = format!(
        "{}[policy]\nheartbeat_interval_ms = 0\n[timeouts]\npreamble_timeout_ms = 0\n",
        base(&l)
    );
    let (code, err) = check(d.path(), &text);
    assert_eq!(code, 64);
    assert!(err.contains("policy.heartbeat_interval_ms"), "{err}");
    assert!(err.contains("timeouts.preamble_timeout_ms"), "{err}");
}

/// Values that pass one by one but not together, and endpoints that
/// could never be dialled: each refused under its key.
#[test]
fn inconsistent_cluster_timings_and_bad_endpoints_are_named() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    for (extra, key) in [
        (
            "heartbeat_interval_ms = 250\nlease_timeout_ms = 200\n",
            "cluster.lease_timeout_ms",
        ),
        ("unleased_exit_ms = 100\n", "cluster.unleased_exit_ms"),
        (
            "membership_endpoints = [\"https://r1:7600\"]\nrouters = [\"127.0.0.1\"]\n",
            "cluster.membership_endpoints",
        ),
        (
            "membership_endpoints = [\"r1\"]\nrouters = [\"127.0.0.1\"]\n",
            "cluster.membership_endpoints",
        ),
        // Sizes that would panic at start (a queue or semaphore that big).
        (
            "[events]\nqueue_capacity = 100000000000\n",
            "events.queue_capacity",
        ),
        (
            "[admission]\nmax_tls_handshakes_in_flight = 100000000000\n",
            "admission.max_tls_handshakes_in_flight",
        ),
    ] {
        let (code, err) = check(d.path(), &format!("{}{extra}", base(&l)));
        assert_eq!(code, 64, "{extra}");
        assert!(err.contains(key), "{key}: {err}");
    }
    // Both listeners on one address (nothing binds in `check`).
    let same = SocketAddr::from(([127, 0, 0, 1], 9));
    let text = base(&l).replace(
        "admin_addr = \"127.0.0.1:0\"",
        &format!("admin_addr = \"{same}\""),
    );
    let text = text.replace(
        "client_addr = \"127.0.0.1:0\"",
        &format!("client_addr = \"{same}\""),
    );
    let (code, err) = check(d.path(), &text);
    assert_eq!(code, 64, "{text}");
    assert!(
        err.contains("admin_addr: is client_addr's address"),
        "{err}"
    );
}

#[test]
fn membership_files_that_make_no_tls_client_are_named_at_start() {
    let d = tempfile::tempdir().unwrap();
    let l = init(&PkiSpec {
        out: d.path().join("pki"),
        cluster: "jvpn-dev".into(),
        nodes: vec!["g1".into(), "g2".into()],
        routers: vec!["r1".into()],
        agents: 1,
    })
    .unwrap();
    let with = |key: &Path| {
        format!(
            "{}membership_endpoints = [\"127.0.0.1:7600\"]\nrouters = [\"127.0.0.1\"]\n\
             membership_cert_file = \"{}\"\nmembership_key_file = \"{}\"\n\
             membership_ca_file = \"{}\"\n",
            base(&l),
            l.membership_cert("g1").display(),
            key.display(),
            l.membership_ca().display()
        )
    };
    let (code, err) = check(d.path(), &with(&l.membership_key("g1")));
    assert_eq!(code, 0, "{err}");
    // Each file is PEM; the key is another node's.
    let (code, err) = check(d.path(), &with(&l.membership_key("g2")));
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("cluster.membership_key_file"), "{err}");
}

#[test]
fn a_negative_duration_is_named() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let (code, err) = check(
        d.path(),
        &format!("{}[policy]\nswitch_cooldown_ms = -5\n", base(&l)),
    );
    assert_eq!(code, 64);
    assert!(err.contains("switch_cooldown_ms"), "{err}");
}

#[test]
fn a_missing_certificate_file_is_named() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let text = base(&l).replace(
        &l.gateway_cert("g1").display().to_string(),
        "/nonexistent/cert.pem",
    );
    let (code, err) = check(d.path(), &text);
    assert_eq!(code, 64);
    assert!(
        err.contains("tls.cert_file") && err.contains("/nonexistent/cert.pem"),
        "{err}"
    );
}

#[test]
fn several_bad_keys_are_all_reported() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let text = format!(
        "{}[admission]\nresume_share = 2.0\nmax_connections = 0\n",
        base(&l).replace("node_id = \"g1\"", "node_id = \"bad id\"")
    );
    let (code, err) = check(d.path(), &text);
    assert_eq!(code, 64);
    for key in [
        "node_id",
        "admission.resume_share",
        "admission.max_connections",
    ] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
}

#[test]
fn precedence_is_env_then_file_then_default() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let path = d.path().join("gw.toml");
    std::fs::write(
        &path,
        format!("{}[policy]\nswitch_cooldown_ms = 2000\n", base(&l)),
    )
    .unwrap();
    let none: Vec<(String, String)> = vec![];
    let from_file = config::load_with_env(&path, none.clone()).unwrap();
    assert_eq!(
        from_file.raw.policy.switch_cooldown_ms, 2000,
        "file beats default"
    );
    assert_eq!(
        from_file.raw.policy.heartbeat_interval_ms, 500,
        "default where the file is silent"
    );
    let env = vec![(
        "JVPN_GATEWAY__POLICY__SWITCH_COOLDOWN_MS".to_owned(),
        "3000".to_owned(),
    )];
    let from_env = config::load_with_env(&path, env).unwrap();
    assert_eq!(
        from_env.raw.policy.switch_cooldown_ms, 3000,
        "env beats file"
    );
    // A bad value from the environment is named like one from the file.
    let env = vec![(
        "JVPN_GATEWAY__POLICY__SWITCH_COOLDOWN_MS".to_owned(),
        "0".to_owned(),
    )];
    let err = config::load_with_env(&path, env).unwrap_err();
    assert!(
        err.to_string().contains("policy.switch_cooldown_ms"),
        "{err}"
    );
}

/// Runs `jvpn-gateway check` on a deploy example from a directory holding
/// a PKI for it, and checks every key it sets is documented.
fn check_example(example: &str, nodes: &[&str], min_keys: usize) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let example = root.join(example);
    let d = tempfile::tempdir().unwrap();
    init(&PkiSpec {
        out: d.path().join("pki"),
        cluster: "jvpn-dev".into(),
        nodes: nodes.iter().map(|s| (*s).to_owned()).collect(),
        routers: vec!["r1".into(), "r2".into()],
        agents: 1,
    })
    .unwrap();
    if std::fs::read_to_string(&example)
        .unwrap()
        .contains("\n[store]")
    {
        jvpn_gateway::pki::mint_etcd(&d.path().join("pki"), "jvpn-dev", 3).unwrap();
    }
    // Relative paths resolve against the directory holding pki/. The
    // examples log events under /var/log/jvpn (made by the systemd unit's
    // LogsDirectory=); here they go to the PKI's directory instead.
    let out = Command::new(env!("CARGO_BIN_EXE_jvpn-gateway"))
        .args(["check", "--config"])
        .arg(&example)
        .current_dir(d.path())
        .env("JVPN_GATEWAY__EVENTS__PATH", d.path().join("events.jsonl"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        example.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = std::fs::read_to_string(root.join("docs/configuration.md")).unwrap();
    let text = std::fs::read_to_string(&example).unwrap();
    let (keys, missing) = jvpn_runtime::config::undocumented_keys(&text, &docs);
    assert!(
        missing.is_empty(),
        "not in docs/configuration.md: {missing:?}"
    );
    assert!(keys >= min_keys, "the example covers every key ({keys})");
}

#[test]
fn the_deploy_examples_pass_check_and_every_key_is_documented() {
    check_example("deploy/single-node/g1.toml", &["g1"], 25);
    for g in ["g1", "g2", "g3"] {
        check_example(&format!("deploy/cluster/{g}.toml"), &["g1", "g2", "g3"], 38);
        check_example(
            &format!("deploy/cluster-etcd/{g}.toml"),
            &["g1", "g2", "g3"],
            47,
        );
    }
}

#[test]
fn router_list_from_the_environment() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let path = d.path().join("gw.toml");
    std::fs::write(&path, base(&l)).unwrap();
    let env = vec![(
        "JVPN_GATEWAY__CLUSTER__ROUTERS".to_owned(),
        "127.0.0.1,10.0.0.2".to_owned(),
    )];
    let cfg = config::load_with_env(&path, env).unwrap();
    assert_eq!(
        cfg.raw.cluster.routers.len(),
        2,
        "{:?}",
        cfg.raw.cluster.routers
    );
}

/// Every key the gateway understands (taken from the configuration type
/// itself, not from an example) is described in docs/configuration.md.
#[test]
fn every_gateway_config_key_is_documented() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let path = d.path().join("gw.toml");
    std::fs::write(&path, base(&l)).unwrap();
    let cfg = config::load_with_env(&path, Vec::new()).unwrap();
    let keys = jvpn_runtime::config::all_keys(&cfg.raw);
    assert!(keys.len() >= 40, "{keys:?}");
    assert!(
        keys.iter().any(|k| k == "admission.tls_queue_wait_ms"),
        "{keys:?}"
    );
    let docs = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md"),
    )
    .unwrap();
    let missing = jvpn_runtime::config::undocumented(&keys, &docs);
    assert!(
        missing.is_empty(),
        "not in docs/configuration.md: {missing:?}"
    );
}

#[test]
fn version_flag_prints_the_release() {
    let out = Command::new(env!("CARGO_BIN_EXE_jvpn-gateway"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        format!("jvpn-gateway {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn a_value_of_the_wrong_type_is_refused_under_its_full_key() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let good = base(&l);
    for (text, key) in [
        (good.replace("node_id = \"g1\"", "node_id = 7"), "node_id"),
        (
            good.replace("node_id = \"g1\"", "node_id = true"),
            "node_id",
        ),
        (format!("{good}weight = 1.0\n"), "cluster.weight"),
        (
            format!("{good}[policy]\nheartbeat_interval_ms = \"500\"\n"),
            "policy.heartbeat_interval_ms",
        ),
    ] {
        let (code, err) = check(d.path(), &text);
        assert_eq!(code, 64, "{key} accepted: {text}");
        assert!(err.contains(key), "{key}: {err}");
        assert!(err.contains("invalid type"), "{key}: {err}");
    }
}

#[test]
fn an_unknown_key_in_a_section_is_named_with_its_section() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let (code, err) = check(
        d.path(),
        &format!("{}[policy]\nheartbeat_interval = 5\n", base(&l)),
    );
    assert_eq!(code, 64);
    assert!(err.contains("policy.heartbeat_interval"), "{err}");
}

#[test]
fn check_names_an_events_directory_that_does_not_exist_or_cannot_be_written() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let missing = d.path().join("no-such-dir").join("events.jsonl");
    let (code, err) = check(
        d.path(),
        &format!("{}[events]\npath = \"{}\"\n", base(&l), missing.display()),
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("events.path"), "{err}");
    assert!(
        err.contains(&missing.parent().unwrap().display().to_string()),
        "{err}"
    );
}

#[test]
fn a_bad_syslog_collector_is_named() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let (code, err) = check(
        d.path(),
        &format!("{}[events]\nsyslog_addr = \"siem.example.net\"\n", base(&l)),
    );
    assert_eq!(code, 64);
    assert!(
        err.contains("events.syslog_addr") && err.contains("HOST:PORT"),
        "{err}"
    );
    let (code, err) = check(
        d.path(),
        &format!(
            "{}[events]\nsyslog_addr = \"127.0.0.1:6514\"\nsyslog_tls_ca_file = \"{}\"\n",
            base(&l),
            d.path().join("missing.pem").display()
        ),
    );
    assert_eq!(code, 64);
    assert!(err.contains("events.syslog_tls_ca_file"), "{err}");
    let (code, err) = check(
        d.path(),
        &format!(
            "{}[events]\nsyslog_addr = \"127.0.0.1:6514\"\nsyslog_tls_ca_file = \"{}\"\n",
            base(&l),
            l.client_ca().display()
        ),
    );
    assert_eq!(code, 0, "{err}");
}

#[test]
fn every_wrong_type_is_named_even_after_a_section_the_environment_completes() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let cert = l.gateway_cert("g1").display().to_string();
    // [tls] lacks cert_file (the environment gives it); two wrong types
    // after it must both be named.
    let text = base(&l)
        .replace(&format!("cert_file = \"{cert}\"\n"), "")
        .replace("node_id = \"g1\"", "node_id = 7")
        + "weight = 1.0\n";
    let path = d.path().join("gw.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_jvpn-gateway"))
        .args(["check", "--config"])
        .arg(&path)
        .env("JVPN_GATEWAY__TLS__CERT_FILE", &cert)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    for key in ["node_id", "cluster.weight"] {
        assert!(
            err.contains(&format!("{key}: invalid type")),
            "{key}: {err}"
        );
    }
}

#[test]
fn a_bad_store_section_names_each_key() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let store = "[store]\nbackend = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n\
                 prefix = \"jvpn/\"\nlease_ttl_ms = 2500\nlease_margin_ms = 0\n\
                 request_timeout_ms = 0\nsweep_page = 0\nsweep_interval_ms = 5\nca_file = \"/nonexistent/ca.pem\"\n";
    let (code, err) = check(d.path(), &format!("{}{store}", base(&l)));
    assert_eq!(code, 64, "{err}");
    for key in [
        "store.endpoints",
        "store.prefix",
        "store.lease_ttl_ms",
        "store.lease_margin_ms",
        "store.request_timeout_ms",
        "store.sweep_page",
        "store.sweep_interval_ms",
        "store.ca_file",
        "store.cert_file",
        "store.key_file",
    ] {
        assert!(err.contains(key), "{key} not named: {err}");
    }
    // Above zero but too long for the TTL: named too.
    let store = "[store]\nbackend = \"etcd\"\nendpoints = [\"https://127.0.0.1:2379\"]\n\
                 lease_ttl_ms = 3000\nlease_margin_ms = 1600\nrequest_timeout_ms = 1001\n";
    let (code, err) = check(d.path(), &format!("{}{store}", base(&l)));
    assert_eq!(code, 64, "{err}");
    for key in ["store.lease_margin_ms", "store.request_timeout_ms"] {
        assert!(err.contains(key), "{key} not named: {err}");
    }
    assert!(!err.contains("store.lease_ttl_ms:"), "{err}");
    // The default (memory) needs none of it; an unknown backend is named.
    let (code, err) = check(
        d.path(),
        &format!("{}[store]\nbackend = \"redis\"\n", base(&l)),
    );
    assert_eq!(code, 64);
    assert!(err.contains("store.backend"), "{err}");
}

#[test]
fn a_good_store_section_passes() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let e = jvpn_gateway::pki::mint_etcd(d.path(), "jvpn-dev", 1).unwrap();
    let store = format!(
        "[store]\nbackend = \"etcd\"\nendpoints = [\"https://127.0.0.1:2379\"]\n\
         ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        e.ca.display(),
        e.client.0.display(),
        e.client.1.display()
    );
    let (code, err) = check(d.path(), &format!("{}{store}", base(&l)));
    assert_eq!(code, 0, "{err}");
    let path = d.path().join("gw.toml");
    let cfg = config::load_with_env(&path, Vec::new()).unwrap();
    let s = cfg.store.unwrap();
    assert_eq!(s.prefix, format!("/jvpn/{}", cfg.raw.cluster.name));
    assert_eq!(s.endpoints, ["https://127.0.0.1:2379"]);
}

/// A reload may rotate the cluster secret (and its previous one) and set
/// `store.record_seal`, but change nothing else of `[store]`, which is read
/// once at start: such a reload used to be accepted and had no effect. It
/// is refused, named, like any restart-only change.
#[test]
fn a_reload_may_rotate_the_secrets_but_not_change_the_store() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let path = d.path().join("gw.toml");
    std::fs::write(&path, base(&l)).unwrap();
    let none: Vec<(String, String)> = vec![];
    let old = config::load_with_env(&path, none.clone()).unwrap().raw;
    let env = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
    let seal = config::load_with_env(&path, env("JVPN_GATEWAY__STORE__RECORD_SEAL", "1"))
        .unwrap()
        .raw;
    assert!(config::restart_only_changes(&old, &seal).is_empty());
    let ttl = config::load_with_env(&path, env("JVPN_GATEWAY__STORE__LEASE_TTL_MS", "4000"))
        .unwrap()
        .raw;
    assert_eq!(config::restart_only_changes(&old, &ttl), ["store"]);
    let previous = config::load_with_env(
        &path,
        env(
            "JVPN_GATEWAY__CLUSTER__PREVIOUS_SECRET_FILE",
            &l.secret().display().to_string(),
        ),
    );
    // The same file twice is the same key id: refused by validation.
    assert!(previous.is_err());
}

/// The `[egress]` examples in docs/configuration.md pass `check` as
/// written, and an `[[egress.limits]]` naming a principal twice is refused
/// with the key of the entry that did.
#[test]
fn the_egress_examples_in_the_docs_pass_check() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let docs = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md"),
    )
    .unwrap();
    let section = docs
        .split("\n## ")
        .find(|s| s.starts_with("`[egress]`"))
        .expect("an [egress] section");
    let blocks: Vec<&str> = section
        .split("```toml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    assert!(blocks.len() >= 2, "{blocks:?}");
    assert!(blocks.iter().any(|b| b.contains("[[egress.limits]]")));
    for b in &blocks {
        let (code, err) = check(d.path(), &format!("{}{b}", base(&l)));
        assert_eq!(code, 0, "{b}\n{err}");
    }
    let twice = "[[egress.limits]]\nprincipals = [\"backup\"]\nmax_streams = 2\n\n\
                 [[egress.limits]]\nprincipals = [\"backup\"]\nconnect_timeout_ms = 10\n";
    let (code, err) = check(d.path(), &format!("{}{twice}", base(&l)));
    assert_ne!(code, 0);
    assert!(err.contains("egress.limits[1].principals"), "{err}");
}
