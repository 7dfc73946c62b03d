//! `jvpn-router check`: full validation without binding, naming every bad
//! key; environment beats file beats default; the deploy example passes and
//! every key it sets is documented.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use std::path::PathBuf;

use jvpn_router::config;

/// The files a router reads, at the paths `jvpn-gateway pki init` uses
/// (the router's tests do not link the gateway to make them).
struct PkiLayout {
    dir: PathBuf,
}

impl PkiLayout {
    fn secret(&self) -> PathBuf {
        self.dir.join("cluster.secret")
    }
    fn membership_ca(&self) -> PathBuf {
        self.dir.join("membership-ca.pem")
    }
    fn router_cert(&self, r: &str) -> PathBuf {
        self.dir.join(format!("membership/router-{r}.pem"))
    }
    fn router_key(&self, r: &str) -> PathBuf {
        self.dir.join(format!("membership/router-{r}.key"))
    }
}

fn pki(dir: &Path) -> PkiLayout {
    let l = PkiLayout {
        dir: dir.join("pki"),
    };
    std::fs::create_dir_all(l.dir.join("membership")).unwrap();
    std::fs::write(l.secret(), format!("1:{}\n", "5a".repeat(32))).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&ca_key)
        .unwrap();
    std::fs::write(l.membership_ca(), ca.pem()).unwrap();
    for r in ["r1", "r2"] {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["router.jvpn-dev".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(l.router_cert(r), cert.pem()).unwrap();
        std::fs::write(l.router_key(r), key.serialize_pem()).unwrap();
    }
    l
}

fn base(l: &PkiLayout) -> String {
    format!(
        "router_id = \"r1\"\n[cluster]\nsecret_file = \"{}\"\n\
         [membership]\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n",
        l.secret().display(),
        l.router_cert("r1").display(),
        l.router_key("r1").display(),
        l.membership_ca().display(),
    )
}

fn check(text: &str, env: Vec<(String, String)>) -> Result<config::Validated, String> {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let path = d.path().join("r.toml");
    std::fs::write(&path, format!("{}{text}", base(&l))).unwrap();
    config::load_with_env(&path, env).map_err(|e| e.to_string())
}

#[test]
fn defaults_validate() {
    let v = check("", vec![]).unwrap();
    assert_eq!(v.raw.membership.failure_timeout_ms, 1000);
    assert_eq!(v.raw.cluster.vnodes_per_weight, 512);
    assert_eq!(v.router_id.as_str(), "r1");
    // A cluster of 1,000 gateways (each from its own address) fits the
    // defaults: nobody has to find this key before scaling out.
    assert!(
        v.raw.membership.max_sources >= 1_250,
        "{}",
        v.raw.membership.max_sources
    );
}

#[test]
fn membership_files_that_make_no_tls_server_are_named() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let path = d.path().join("r.toml");
    let load = |text: String| {
        std::fs::write(&path, text).unwrap();
        config::load_with_env(&path, vec![]).map_err(|e| e.to_string())
    };
    // Each file is PEM; the key is another router's.
    let other_key = base(&l).replace(
        &l.router_key("r1").display().to_string(),
        &l.router_key("r2").display().to_string(),
    );
    let e = load(other_key).unwrap_err();
    assert!(e.contains("membership.key_file"), "{e}");
    // A CA file holding a key instead of a certificate.
    let key_as_ca = base(&l).replace(
        &l.membership_ca().display().to_string(),
        &l.router_key("r1").display().to_string(),
    );
    let e = load(key_as_ca).unwrap_err();
    assert!(e.contains("membership.ca_file"), "{e}");
}

#[test]
fn bad_values_are_named_by_key() {
    let e = check("[timeouts]\nconnect_timeout_ms = 0\n", vec![]).unwrap_err();
    assert!(e.contains("timeouts.connect_timeout_ms"), "{e}");
    let e = check("[splice]\nbogus = 1\n", vec![]).unwrap_err();
    assert!(e.contains("bogus"), "{e}");
    // A lease no longer than the heartbeat period lapses between two.
    let e = check(
        "",
        vec![
            ("JVPN_ROUTER__MEMBERSHIP__INTERVAL_MS".into(), "250".into()),
            (
                "JVPN_ROUTER__MEMBERSHIP__LEASE_TIMEOUT_MS".into(),
                "200".into(),
            ),
        ],
    )
    .unwrap_err();
    assert!(
        e.contains("membership.lease_timeout_ms: must be above membership.interval_ms"),
        "{e}"
    );
    // Values that would overflow a hold-down or that the kernel refuses.
    let e = check(
        "",
        vec![
            (
                "JVPN_ROUTER__MEMBERSHIP__HOLD_DOWN_MAX_MS".into(),
                "100000000000".into(),
            ),
            (
                "JVPN_ROUTER__SPLICE__KEEPALIVE_MS".into(),
                "40000000".into(),
            ),
        ],
    )
    .unwrap_err();
    for key in ["membership.hold_down_max_ms", "splice.keepalive_ms"] {
        assert!(e.contains(key), "{key}: {e}");
    }
    // Several problems at once, each under its own key.
    let env = vec![
        (
            "JVPN_ROUTER__MEMBERSHIP__LEASE_TIMEOUT_MS".to_owned(),
            "1500".to_owned(),
        ),
        (
            "JVPN_ROUTER__CLUSTER__VNODES_PER_WEIGHT".to_owned(),
            "10".to_owned(),
        ),
        (
            "JVPN_ROUTER__ADMISSION__HELLO_PER_GATEWAY_PER_S".to_owned(),
            "-1".to_owned(),
        ),
    ];
    let e = check("", env).unwrap_err();
    for key in [
        "membership.lease_timeout_ms",
        "cluster.vnodes_per_weight",
        "admission.hello_per_gateway_per_s",
    ] {
        assert!(e.contains(key), "{key} missing from: {e}");
    }
}

#[test]
fn missing_files_are_named_by_key() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let path = d.path().join("r.toml");
    let text = base(&l).replace(
        &l.router_key("r1").display().to_string(),
        "/nonexistent/key.pem",
    );
    std::fs::write(&path, text).unwrap();
    let e = config::load_with_env(&path, vec![])
        .unwrap_err()
        .to_string();
    assert!(e.contains("membership.key_file"), "{e}");
}

#[test]
fn environment_beats_file_beats_default() {
    // Default.
    assert_eq!(check("", vec![]).unwrap().raw.membership.interval_ms, 250);
    // File.
    let v = check("[timeouts]\nconnect_timeout_ms = 700\n", vec![]).unwrap();
    assert_eq!(v.raw.timeouts.connect_timeout_ms, 700);
    // Environment over file.
    let env = vec![(
        "JVPN_ROUTER__TIMEOUTS__CONNECT_TIMEOUT_MS".to_owned(),
        "900".to_owned(),
    )];
    let v = check("[timeouts]\nconnect_timeout_ms = 700\n", env).unwrap();
    assert_eq!(v.raw.timeouts.connect_timeout_ms, 900);
    let env = vec![(
        "JVPN_ROUTER__MEMBERSHIP__ADVERTISE_ALLOW".to_owned(),
        "10.0.0.1,10.0.0.2".to_owned(),
    )];
    let v = check("", env).unwrap();
    assert_eq!(v.raw.membership.advertise_allow.len(), 2);
}

#[test]
fn the_deploy_examples_pass_check_and_every_key_is_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (dir, r) in [
        ("cluster", "r1"),
        ("cluster", "r2"),
        ("cluster-etcd", "r1"),
        ("cluster-etcd", "r2"),
    ] {
        let example = root.join(format!("deploy/{dir}/{r}.toml"));
        let d = tempfile::tempdir().unwrap();
        pki(d.path());
        let out = Command::new(env!("CARGO_BIN_EXE_jvpn-router"))
            .args(["check", "--config"])
            .arg(&example)
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{r}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let docs = std::fs::read_to_string(root.join("docs/configuration.md")).unwrap();
        let text = std::fs::read_to_string(&example).unwrap();
        let (keys, missing) = jvpn_runtime::config::undocumented_keys(&text, &docs);
        assert!(
            missing.is_empty(),
            "not in docs/configuration.md: {missing:?}"
        );
        assert!(keys >= 27, "the example covers every key ({keys})");
        // Topology 3's routers route takeovers; the others do not.
        let takeover = text
            .lines()
            .any(|l| l.split('#').next().unwrap().trim() == "takeover = true");
        assert_eq!(takeover, dir == "cluster-etcd", "{dir}/{r}");
    }
}

#[test]
fn check_exits_64_and_names_the_key() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let path = d.path().join("r.toml");
    std::fs::write(&path, format!("{}[splice]\nbuffer_bytes = 0\n", base(&l))).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_jvpn-router"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("splice.buffer_bytes"));
}

/// Every key the router understands (from the configuration type itself)
/// is described in docs/configuration.md.
#[test]
fn every_router_config_key_is_documented() {
    let d = tempfile::tempdir().unwrap();
    let l = pki(d.path());
    let path = d.path().join("r.toml");
    std::fs::write(&path, base(&l)).unwrap();
    let cfg = jvpn_router::config::load_with_env(&path, Vec::new()).unwrap();
    let keys = jvpn_runtime::config::all_keys(&cfg.raw);
    assert!(keys.len() >= 28, "{keys:?}");
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
    let out = Command::new(env!("CARGO_BIN_EXE_jvpn-router"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        format!("jvpn-router {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn wrong_types_and_unknown_values_are_refused_under_their_full_key() {
    let e = check("[splice]\nmode = \"fast\"\n", vec![]).unwrap_err();
    assert!(e.contains("splice.mode"), "{e}");
    assert!(
        e.contains("copy") && e.contains("pipe"),
        "allowed values: {e}"
    );
    let e = check("[timeouts]\nconnect_timeout_ms = \"1000\"\n", vec![]).unwrap_err();
    assert!(e.contains("timeouts.connect_timeout_ms"), "{e}");
    assert!(e.contains("invalid type"), "{e}");
    let e = check("[splice]\nbogus = 1\n", vec![]).unwrap_err();
    assert!(e.contains("splice.bogus"), "{e}");
}
