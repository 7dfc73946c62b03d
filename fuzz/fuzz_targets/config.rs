#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    jvpn_gateway::fuzzing::config(data);
    jvpn_router::fuzzing::config(data);
});
