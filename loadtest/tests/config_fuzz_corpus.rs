//! Replays the configuration fuzz corpus (`fuzz/corpus/config/`) through
//! the fuzz target's entry point: every kept input stays a regression test.

#![allow(clippy::unwrap_used)]

#[test]
fn config_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let input = std::fs::read(&path).unwrap();
        jvpn_gateway::fuzzing::config(&input);
        jvpn_router::fuzzing::config(&input);
        n += 1;
    }
    assert!(n >= 8, "config corpus has only {n} inputs");
}

/// 20k mutations of the corpus (bytes flipped, lines cut and duplicated)
/// through the same entry point: a bounded fuzz run inside the test suite.
#[test]
fn mutated_configurations_never_panic() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/config");
    let seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    // A small deterministic generator: no extra dependency for the router.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..20_000 {
        let mut v = seeds[i % seeds.len()].clone();
        for _ in 0..(next() % 4 + 1) {
            let r = next() as usize;
            match r % 4 {
                0 if !v.is_empty() => {
                    let at = r / 4 % v.len();
                    v[at] = (next() % 128) as u8;
                }
                1 => v.truncate(r / 4 % (v.len() + 1)),
                2 if !v.is_empty() => {
                    let at = r / 4 % v.len();
                    let piece: Vec<u8> = v[at..].iter().take(40).copied().collect();
                    v.extend(piece);
                }
                _ => v.extend_from_slice(b"\n[x]\nk = \"v\"\n"),
            }
        }
        {
            jvpn_gateway::fuzzing::config(&v);
            jvpn_router::fuzzing::config(&v)
        };
    }
}
