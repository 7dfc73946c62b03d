//! Entry point of the configuration fuzz target (`fuzz/`) for the gateway's
//! configuration: arbitrary text gives a value or a problem naming a key,
//! never a panic. The router's half is `jvpn_router::fuzzing::config`.

use jvpn_runtime::config::{all_keys, parse_toml_str};

use crate::config::{GatewayConfig, restart_only_changes};

pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_toml_str::<GatewayConfig>(text) {
        Ok(g) => {
            let _ = g.policy.validate();
            assert!(restart_only_changes(&g, &g).is_empty());
            assert!(!all_keys(&g).is_empty());
        }
        Err(p) => assert!(!p.key.is_empty(), "a problem without a key: {p}"),
    }
}
