//! Front doors: how applications on the agent's host open streams through
//! the session (issue 15).
//!
//! - [`socks5`]: SOCKS5 `CONNECT`, names resolved at the gateway (sans-IO).
//! - [`http_connect`]: HTTP `CONNECT` tunnels (sans-IO).
//! - [`serve`]: the listeners (proxy port, forwards) that use them.

pub mod http_connect;
pub mod serve;
pub mod socks5;

/// Entry points for the fuzz targets: arbitrary bytes into each parser;
/// whatever parses names a valid target and fits in what was given.
#[doc(hidden)]
pub mod fuzzing {
    pub fn socks5(data: &[u8]) {
        if let Ok(Some(n)) = super::socks5::parse_greeting(data) {
            assert!(n <= data.len());
        }
        if let Ok(Some((t, n))) = super::socks5::parse_request(data) {
            assert!(n <= data.len() && t.port != 0);
            let again = jvpn_proto::stream::Target::parse_authority(&t.to_string());
            assert_eq!(again.as_ref(), Ok(&t), "target does not round-trip");
        }
    }

    pub fn http_connect(data: &[u8]) {
        match super::http_connect::parse(data) {
            Ok(Some((t, n))) => {
                assert!(n <= data.len() && n <= super::http_connect::MAX_HEAD);
                let again = jvpn_proto::stream::Target::parse_authority(&t.to_string());
                assert_eq!(again.as_ref(), Ok(&t), "target does not round-trip");
            }
            Ok(None) => assert!(data.len() <= super::http_connect::MAX_HEAD),
            Err(e) => assert!(!e.response().is_empty()),
        }
    }
}
