//! Entry point of the configuration fuzz target (`fuzz/`) and its corpus
//! regression test: arbitrary text read as a gateway or a router
//! configuration gives a value or a problem naming a key, never a panic.

use jvpn_gateway::config::{self as gw, GatewayConfig, parse_toml_str};

use crate::config::{self as rt, RouterConfig};

pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_toml_str::<GatewayConfig>(text) {
        Ok(g) => {
            let _ = g.policy.validate();
            assert!(gw::restart_only_changes(&g, &g).is_empty());
            assert!(!gw::all_keys(&g).is_empty());
        }
        Err(p) => assert!(!p.key.is_empty(), "a problem without a key: {p}"),
    }
    match parse_toml_str::<RouterConfig>(text) {
        Ok(r) => assert!(rt::restart_only_changes(&r, &r).is_empty()),
        Err(p) => assert!(!p.key.is_empty(), "a problem without a key: {p}"),
    }
}
