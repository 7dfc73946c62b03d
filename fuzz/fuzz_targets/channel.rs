#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| jvpn_proto::fuzzing::channel(data));
