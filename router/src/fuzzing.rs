//! Entry point of the configuration fuzz target (`fuzz/`) for the router's
//! configuration: arbitrary text gives a value or a problem naming a key,
//! never a panic. The gateway's half is `jvpn_gateway::fuzzing::config`.

use jvpn_runtime::config::parse_toml_str;

use crate::config::{RouterConfig, restart_only_changes};

pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_toml_str::<RouterConfig>(text) {
        Ok(r) => assert!(restart_only_changes(&r, &r).is_empty()),
        Err(p) => assert!(!p.key.is_empty(), "a problem without a key: {p}"),
    }
}
