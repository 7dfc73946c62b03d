#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| jvpn_agent::frontdoor::fuzzing::http_connect(data));
