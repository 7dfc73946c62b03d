#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| jvpn_proto::fuzzing::store_record(data));
