//! The dashboard against a real Prometheus (Debian's 2.42) scraping a local
//! cluster while a gateway is SIGKILLed (issue 19, item 1):
//!
//! - every labelled counter series exists from start-up (none is born at a
//!   burst's count, which `rate()` and `increase()` cannot see);
//! - every expression of the dashboard returns data;
//! - the failover panel's `increase()` over the kill matches the routers'
//!   own counters within 10 %.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use jvpn_loadtest::cluster::ClusterOptions;
use jvpn_loadtest::harness::{agent_config, eventually, http_get, scrape, source_ip};
use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The series (`name{labels}`) of every counter in one scrape.
fn counter_series(text: &str) -> BTreeSet<String> {
    let counters: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series))
        .filter(|s| counters.contains(s.split('{').next().unwrap()))
        .map(str::to_owned)
        .collect()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query; the result vector as (labels, value).
async fn query(prom: SocketAddr, expr: &str) -> Vec<(serde_json::Value, f64)> {
    query_at(prom, expr, None).await
}

/// An instant query evaluated at `at` (seconds since the epoch) or now.
async fn query_at(prom: SocketAddr, expr: &str, at: Option<f64>) -> Vec<(serde_json::Value, f64)> {
    let time = at.map_or(String::new(), |t| format!("&time={t:.3}"));
    let (code, body) = http_get(
        prom,
        &format!("/api/v1/query?query={}{time}", percent_encode(expr)),
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{expr}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "success", "{expr}: {body}");
    v["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let value = r["value"][1].as_str().unwrap().parse::<f64>().unwrap();
            (r["metric"].clone(), value)
        })
        .collect()
}

/// Starts Prometheus scraping `targets` every second; its address.
async fn prometheus(dir: &Path, targets: &[SocketAddr]) -> (tokio::process::Child, SocketAddr) {
    let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    let cfg = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: jvpn\n    static_configs:\n      - targets: [{}]\n",
        list.join(", ")
    );
    std::fs::write(dir.join("prometheus.yml"), cfg).unwrap();
    let mut child = tokio::process::Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus (Debian package `prometheus`, installed by .ci/run)");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(l) = lines.next_line().await.unwrap() {
            if l.contains("msg=\"Listening on\"") {
                let a = l.rsplit("address=").next().unwrap().trim();
                return a.parse::<SocketAddr>().unwrap();
            }
        }
        panic!("prometheus exited before listening");
    })
    .await
    .expect("prometheus did not listen within 30 s");
    // Keep draining its log so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

/// The routers' own failover counters, summed over routers.
async fn router_counts(c: &jvpn_loadtest::cluster::LocalCluster) -> BTreeMap<&'static str, f64> {
    let mut out = BTreeMap::new();
    for r in &c.routers {
        let text = r.metrics().await.unwrap();
        let get = |name: &str, labels: &[(&str, &str)]| {
            jvpn_loadtest::harness::metric_value(&text, name, labels)
        };
        let lost = get(
            "jvpn_router_connections_total",
            &[("kind", "resume"), ("result", "owner_lost")],
        );
        let unreachable = get(
            "jvpn_router_connections_total",
            &[("kind", "resume"), ("result", "owner_unreachable")],
        );
        for (k, v) in [
            ("member deaths", get("jvpn_router_member_deaths_total", &[])),
            ("RESUMEs answered owner_lost", lost),
            (
                "splices cut at death",
                get("jvpn_router_connections_closed_on_member_death_total", &[]),
            ),
            ("RESUMEs answered owner_unreachable", unreachable),
        ] {
            *out.entry(k).or_insert(0.0) += v;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_gateway_kill_as_the_routers_counted_it() {
    let c = common::cluster(ClusterOptions::default()).await;
    let mut admins: Vec<SocketAddr> = c.routers.iter().map(|r| r.admin_addr).collect();
    admins.extend(c.gateways.iter().map(|(_, g)| g.admin_addr));
    let mut born: BTreeMap<SocketAddr, BTreeSet<String>> = BTreeMap::new();
    for a in &admins {
        born.insert(*a, counter_series(&scrape(*a).await.unwrap()));
    }
    // Every series the catalogues list is there before any traffic (what
    // the alerts read, e.g. HELLOs refused as auth_failed, included).
    let fresh_router = &born[&c.routers[0].admin_addr];
    for (kind, outcome) in jvpn_router::forward::Outcome::SERIES {
        let s = format!(
            "jvpn_router_connections_total{{kind=\"{kind}\",result=\"{}\"}}",
            outcome.as_str()
        );
        assert!(fresh_router.contains(&s), "{s} missing at start-up");
    }
    let fresh_gateway = &born[&c.gateways[0].1.admin_addr];
    for (name, reasons) in [
        (
            "jvpn_gateway_hellos_total",
            &jvpn_gateway::metrics::HELLO_REFUSALS[..],
        ),
        (
            "jvpn_gateway_resumes_total",
            &jvpn_gateway::metrics::RESUME_REFUSALS[..],
        ),
    ] {
        for r in reasons.iter().map(|r| r.as_str()).chain(["ok"]) {
            let s = format!("{name}{{result=\"{r}\"}}");
            assert!(fresh_gateway.contains(&s), "{s} missing at start-up");
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let (_prom, prom) = prometheus(dir.path(), &admins).await;
    eventually(Duration::from_secs(30), "Prometheus is ready", || async {
        http_get(prom, "/-/ready")
            .await
            .is_ok_and(|(code, _)| code == 200)
    })
    .await
    .unwrap();
    let want = admins.len();
    eventually(
        Duration::from_secs(30),
        "Prometheus scrapes every target",
        || async {
            let up = query(prom, "up").await;
            up.len() == want && up.iter().all(|(_, v)| *v == 1.0)
        },
    )
    .await
    .unwrap();

    // increase() extrapolates from the samples it has: with a window well
    // covered (20 s of 1 s scrapes) the extrapolation stays within a few %.
    eventually(Duration::from_secs(40), "20 s of scrapes", || async {
        let n = query(prom, "min(count_over_time(up[1m]))").await;
        n.first().is_some_and(|(_, v)| *v >= 20.0)
    })
    .await
    .unwrap();
    let victim = "g2";
    let (fleet, _before, who) = common::settled_fleet(&c, 150, victim).await;

    let before = router_counts(&c).await;
    let t0 = Instant::now();
    c.gateway(victim).unwrap().signal(Signal::SIGKILL).unwrap();
    common::wait_moved(&fleet, &who, victim, t0).await;
    // One resume on a survivor (the victim's metrics are gone with it), so
    // that the recovery panel has an observation.
    let cfg = agent_config(&c.pki, c.router_addrs(), Some(source_ip(200))).unwrap();
    let mut a = jvpn_agent::Agent::new(cfg).unwrap();
    drop(common::hello(&mut a).await);
    let _t = common::resume(&mut a).await.unwrap();
    let after = router_counts(&c).await;
    let counted: BTreeMap<&str, f64> = after.iter().map(|(k, v)| (*k, v - before[k])).collect();
    eprintln!("routers counted over the kill: {counted:?}");
    assert_eq!(counted["member deaths"], 1.0);
    assert!(counted["RESUMEs answered owner_lost"] >= who.len() as f64 / 2.0);
    // The panel is compared on real counts, not 0 against 0 (splices cut
    // at a death need a death before the socket closes, which a SIGKILL's
    // reset usually beats: that one may be 0).
    assert!(
        counted["RESUMEs answered owner_unreachable"] > 0.0,
        "{counted:?}"
    );

    // Prometheus holds the routers' latest values (a scrape after the
    // moves), then the panel is read while its window still covers the kill.
    eventually(
        Duration::from_secs(20),
        "Prometheus has the latest scrape",
        || async {
            let lost = query(
                prom,
                "sum(jvpn_router_connections_total{result=\"owner_lost\"})",
            )
            .await;
            lost.first().map(|(_, v)| *v) == Some(after["RESUMEs answered owner_lost"])
        },
    )
    .await
    .unwrap();
    // rate() needs two samples of the resume histogram, born at the resume.
    eventually(
        Duration::from_secs(20),
        "two scrapes of the resume histogram",
        || async {
            let n = query(
                prom,
                "max(count_over_time(jvpn_gateway_resume_duration_seconds_count[1m]))",
            )
            .await;
            n.first().is_some_and(|(_, v)| *v >= 2.0)
        },
    )
    .await
    .unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(50),
        "the kill left the 1m window"
    );

    // Read the panel at the newest scrape (a Grafana refresh lands anywhere
    // in the scrape interval; this is the fairest point for a test).
    let at = query(prom, "max(timestamp(up))").await[0].1;
    let dash = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/jvpn-cluster.json"),
    )
    .unwrap();
    let dash: serde_json::Value = serde_json::from_str(&dash).unwrap();
    let mut empty = Vec::new();
    let mut checked = 0;
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let result = query_at(prom, expr, Some(at)).await;
            if result.is_empty() {
                empty.push(expr.to_owned());
            }
            if p["title"].as_str().unwrap().starts_with("Failover") {
                let legend = t["legendFormat"].as_str().unwrap();
                let want = counted[legend];
                let got = result.first().map_or(f64::NAN, |(_, v)| *v);
                eprintln!("failover panel {legend}: Prometheus {got:.2}, routers {want}");
                assert!(
                    (got - want).abs() <= 0.1 * want.max(1.0) && (want > 0.0 || got == 0.0),
                    "{legend}: the panel shows {got}, the routers counted {want}"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 4, "the failover panel's four expressions");
    assert!(
        empty.is_empty(),
        "dashboard expressions without data: {empty:?}"
    );

    // No counter series was born after start-up (surviving processes).
    let dead = c.gateway(victim).unwrap().admin_addr;
    for a in admins.iter().filter(|a| **a != dead) {
        let later = counter_series(&scrape(*a).await.unwrap());
        let new: Vec<&String> = later.difference(&born[a]).collect();
        assert!(
            new.is_empty(),
            "{a}: counter series born after start-up: {new:?}"
        );
    }
    drop(fleet.close().await);
}
