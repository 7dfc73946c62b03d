//! The crate graph points one way: proto ← runtime ← {gateway, router,
//! agent} ← loadtest. In particular the stateless router never links the
//! gateway (its session engine, PKI, TLS server): checked from `cargo
//! metadata`, normal, dev and build dependencies alike, so the wall cannot
//! come back silently.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

/// Each workspace crate and the workspace crates it may depend on.
const ALLOWED: &[(&str, &[&str])] = &[
    ("jvpn-proto", &[]),
    ("jvpn-runtime", &["jvpn-proto"]),
    ("jvpn-gateway", &["jvpn-proto", "jvpn-runtime"]),
    ("jvpn-router", &["jvpn-proto", "jvpn-runtime"]),
    ("jvpn-agent", &["jvpn-proto", "jvpn-runtime"]),
    (
        "jvpn-loadtest",
        &[
            "jvpn-proto",
            "jvpn-runtime",
            "jvpn-gateway",
            "jvpn-router",
            "jvpn-agent",
        ],
    ),
];

/// Workspace crate → the workspace crates it depends on, from `cargo metadata`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut g = BTreeMap::new();
    for p in meta["packages"].as_array().unwrap() {
        let deps = p["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_owned())
            .filter(|n| n.starts_with("jvpn-"))
            .collect();
        g.insert(p["name"].as_str().unwrap().to_owned(), deps);
    }
    g
}

/// Every edge of `g` that the rule forbids, and every crate it does not know.
fn violations(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut out = Vec::new();
    for (krate, deps) in g {
        let Some(ok) = allowed.get(krate.as_str()) else {
            out.push(format!("{krate} is not placed in ALLOWED"));
            continue;
        };
        for d in deps {
            if !ok.contains(&d.as_str()) {
                out.push(format!("{krate} depends on {d}"));
            }
        }
    }
    out
}

#[test]
fn dependencies_point_one_way_and_the_router_never_links_the_gateway() {
    let g = graph();
    assert_eq!(g.len(), ALLOWED.len(), "{:?}", g.keys());
    let bad = violations(&g);
    assert!(
        bad.is_empty(),
        "against proto ← runtime ← {{gateway, router, agent}} ← loadtest: {bad:?}"
    );
    assert!(g["jvpn-router"].contains("jvpn-runtime"));
}

/// The checker can fail: the old wall (router → gateway) and a new crate
/// nobody placed are both reported.
#[test]
fn the_check_refuses_a_router_that_links_the_gateway() {
    let mut g = graph();
    g.get_mut("jvpn-router")
        .unwrap()
        .insert("jvpn-gateway".into());
    g.insert("jvpn-new".into(), BTreeSet::new());
    let bad = violations(&g);
    assert!(
        bad.contains(&"jvpn-router depends on jvpn-gateway".to_owned()),
        "{bad:?}"
    );
    assert!(
        bad.contains(&"jvpn-new is not placed in ALLOWED".to_owned()),
        "{bad:?}"
    );
}
