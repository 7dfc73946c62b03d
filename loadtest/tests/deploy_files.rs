//! The operator material in `deploy/` is real: Prometheus accepts the
//! scrape config and rules, every alert's unit tests pass, systemd accepts
//! the units, and every metric the dashboard and the alerts read exists in
//! what a running cluster exports.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use jvpn_loadtest::cluster::ClusterOptions;
use jvpn_loadtest::harness::{agent_config, source_ip};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Runs a tool (installed by `.ci/run`) and fails with its output.
fn run_ok(program: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} could not run ({e}); .ci/run installs it"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?}:\n{text}");
    text
}

#[test]
fn promtool_accepts_the_scrape_config_and_rules_and_the_alert_tests_pass() {
    let dir = deploy().join("prometheus");
    run_ok("promtool", &["check", "config", "prometheus.yml"], &dir);
    // The compose variant mounts alerts.yml beside it inside the container.
    run_ok(
        "promtool",
        &["check", "config", "--syntax-only", "prometheus-compose.yml"],
        &deploy().join("docker"),
    );
    let rules = run_ok("promtool", &["check", "rules", "alerts.yml"], &dir);
    assert!(rules.contains("SUCCESS"), "{rules}");
    let tests = run_ok("promtool", &["test", "rules", "alerts_test.yml"], &dir);
    assert!(tests.contains("SUCCESS"), "{tests}");
}

#[test]
fn every_alert_has_a_unit_test_and_a_runbook_entry() {
    let dir = deploy().join("prometheus");
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("alerts_test.yml")).unwrap();
    let ops = std::fs::read_to_string(deploy().join("../docs/operations.md")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 14, "{alerts:?}");
    for a in alerts {
        assert!(
            tests.contains(&format!("alertname: {a}")),
            "{a} has no promtool test"
        );
        assert!(
            ops.contains(&format!("### {a}")),
            "{a} has no runbook entry in docs/operations.md"
        );
    }
}

/// `systemd-analyze verify` on each unit, with the binaries it names
/// pointed at this build.
#[test]
fn systemd_accepts_the_units() {
    let d = tempfile::tempdir().unwrap();
    for (unit, bin) in [
        ("jvpn-gateway@.service", env!("CARGO_BIN_EXE_jvpn-loadtest")),
        ("jvpn-router@.service", env!("CARGO_BIN_EXE_jvpn-loadtest")),
    ] {
        let text = std::fs::read_to_string(deploy().join("systemd").join(unit)).unwrap();
        assert!(
            text.contains("\nType=notify\n"),
            "{unit}: readiness via sd_notify"
        );
        if unit.starts_with("jvpn-gateway") {
            assert!(
                text.lines()
                    .any(|l| l.starts_with("RestartPreventExitStatus=") && l.contains("75")),
                "{unit}: a superseded gateway (exit 75) must not be restarted"
            );
        }
        let prog = if unit.starts_with("jvpn-gateway") {
            "/usr/local/bin/jvpn-gateway"
        } else {
            "/usr/local/bin/jvpn-router"
        };
        let local = text.replace(prog, bin);
        let instance = unit.replace("@.service", "@n1.service");
        std::fs::write(d.path().join(unit), &local).unwrap();
        std::os::unix::fs::symlink(d.path().join(unit), d.path().join(&instance)).unwrap();
        run_ok(
            "systemd-analyze",
            &["verify", "--man=no", &instance],
            d.path(),
        );
    }
    // The store's etcd members (topology 3): Debian's /usr/bin/etcd as is.
    let unit = "etcd@.service";
    let text = std::fs::read_to_string(deploy().join("etcd").join(unit)).unwrap();
    assert!(text.contains("\nType=notify\n"), "{unit}: etcd notifies");
    assert!(text.contains("ExecStart=/usr/bin/etcd\n"), "{unit}");
    std::fs::write(d.path().join(unit), &text).unwrap();
    std::os::unix::fs::symlink(d.path().join(unit), d.path().join("etcd@e1.service")).unwrap();
    run_ok(
        "systemd-analyze",
        &["verify", "--man=no", "etcd@e1.service"],
        d.path(),
    );
}

/// Metric names an expression reads (`_bucket`/`_sum`/`_count` folded into
/// their histogram).
fn metric_names(text: &str, out: &mut BTreeSet<String>) {
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("jvpn_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if boundary {
            let mut name = &text[start..end];
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix) {
                    name = base;
                }
            }
            out.insert(name.to_owned());
        }
        i = end;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_in_the_dashboard_and_the_alerts_exists_in_a_running_cluster() {
    let mut wanted = BTreeSet::new();
    let dash = std::fs::read_to_string(deploy().join("grafana/jvpn-cluster.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&dash).unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            metric_names(t["expr"].as_str().unwrap(), &mut wanted);
        }
    }
    let rules = std::fs::read_to_string(deploy().join("prometheus/alerts.yml")).unwrap();
    for l in rules
        .lines()
        .filter(|l| l.trim_start().starts_with("expr:"))
    {
        metric_names(l, &mut wanted);
    }
    assert!(wanted.len() >= 25, "{wanted:?}");

    // A small cluster with a little traffic: sessions, a resume.
    let c = common::cluster(ClusterOptions {
        gateways: 2,
        routers: 1,
        ..ClusterOptions::default()
    })
    .await;
    let cfg = agent_config(&c.pki, c.router_addrs(), Some(source_ip(1))).unwrap();
    let mut a = jvpn_agent::Agent::new(cfg).unwrap();
    let t = common::hello(&mut a).await;
    drop(t);
    let _t = common::resume(&mut a).await.unwrap();

    let mut exported = BTreeSet::new();
    let mut scrapes = Vec::new();
    for r in &c.routers {
        scrapes.push(r.metrics().await.unwrap());
    }
    for (_, g) in &c.gateways {
        scrapes.push(g.metrics().await.unwrap());
    }
    for s in &scrapes {
        for l in s.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                exported.insert(rest.split(' ').next().unwrap().to_owned());
            }
        }
    }
    let missing: Vec<&String> = wanted.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "read by the dashboard or alerts but not exported: {missing:?}"
    );
}

/// `jvpn-loadtest cluster`: up with one command, a Prometheus config that
/// promtool accepts and whose every target answers `/metrics`, down on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_command_local_cluster_is_ready_for_prometheus() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("lc");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_jvpn-loadtest"))
        .args(["cluster", "--gateways", "2", "--routers", "1", "--dir"])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let ready = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(l) = lines.next_line().await.unwrap() {
            if l.starts_with("JVPN_CLUSTER_READY") {
                return true;
            }
            printed.push(l);
        }
        false
    })
    .await
    .expect("cluster not ready within 60 s");
    assert!(ready, "cluster exited before it was ready");
    // Every process on a line of its own: role, node, pid, addresses, the
    // log and config files, kept in --dir.
    let procs: Vec<&String> = printed
        .iter()
        .filter(|l| l.trim_start().starts_with("router ") || l.trim_start().starts_with("gateway "))
        .collect();
    assert_eq!(procs.len(), 3, "{printed:#?}");
    let mut logs = Vec::new();
    let mut configs = Vec::new();
    for l in &procs {
        let field = |k: &str| {
            let i = l
                .find(&format!("{k} "))
                .unwrap_or_else(|| panic!("no {k} in {l}"));
            l[i + k.len() + 1..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned()
        };
        let pid: i32 = field("pid").parse().unwrap();
        assert!(Path::new(&format!("/proc/{pid}")).exists(), "{l}");
        for k in ["log", "config"] {
            let f = PathBuf::from(field(k));
            assert!(f.is_file() && f.starts_with(&dir), "{k} of {l}");
            if k == "log" {
                logs.push(f);
            } else {
                configs.push(f);
            }
        }
        assert!(field("admin").starts_with("http://127.0.0.1:"), "{l}");
    }
    run_ok("promtool", &["check", "config", "prometheus.yml"], &dir);
    let yml = std::fs::read_to_string(dir.join("prometheus.yml")).unwrap();
    let targets: Vec<std::net::SocketAddr> =
        yml.split('"').filter_map(|s| s.parse().ok()).collect();
    assert_eq!(targets.len(), 3, "{yml}");
    // Dashboards and alerts name nodes, not ports.
    for node in ["r1", "g1", "g2"] {
        assert!(yml.contains(&format!("instance: {node}")), "{yml}");
    }
    for t in targets {
        let text = jvpn_loadtest::harness::scrape(t).await.unwrap();
        assert!(text.contains("jvpn_build_info"), "{t}");
    }
    assert!(dir.join("pki/client-ca.pem").exists());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    // What the processes wrote stays for the operator to read, and every
    // file their configs name is still there (the PKI is kept in --dir).
    for f in &logs {
        assert!(f.is_file(), "{} was removed", f.display());
    }
    for c in &configs {
        let text = std::fs::read_to_string(c).unwrap();
        let named: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("_file") && l.contains('='))
            .filter_map(|l| l.split('"').nth(1))
            .collect();
        assert!(!named.is_empty(), "{}", c.display());
        for f in named {
            let f = Path::new(f);
            assert!(
                f.is_file() && f.starts_with(&dir),
                "{} names {}",
                c.display(),
                f.display()
            );
        }
    }
}

/// Metric names a text mentions: `jvpn_` followed by lower-case words.
fn jvpn_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("jvpn_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// The metric tables in docs/operations.md list exactly the metrics the
/// binaries' catalogues (`metrics.rs`, the one place each metric is named)
/// export: none missing, none stale.
#[test]
fn the_metric_tables_list_every_exported_metric_and_nothing_else() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut exported = BTreeSet::new();
    for f in [
        "gateway/src/metrics.rs",
        "router/src/metrics.rs",
        "runtime/src/metrics.rs",
    ] {
        let text = std::fs::read_to_string(root.join(f)).unwrap();
        for l in text
            .lines()
            .filter(|l| l.trim_start().starts_with("pub const") && l.contains(": &str = \"jvpn_"))
        {
            exported.extend(jvpn_names(l));
        }
    }
    assert!(exported.len() >= 60, "catalogue read: {exported:?}");
    let docs = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    let mut documented = BTreeSet::new();
    for row in docs.lines().filter(|l| l.starts_with("| `jvpn_")) {
        // The first column names the metric(s); the rest may mention others.
        documented.extend(jvpn_names(row.split('|').nth(1).unwrap()));
    }
    let missing: Vec<_> = exported.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&exported).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "not in the tables: {missing:?}; in the tables but not exported: {stale:?}"
    );
}
