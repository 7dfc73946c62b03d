//! Ordered incarnations (issue 18 A3, design note 31). Each process start
//! of a node id gets an incarnation larger than any earlier one: the start
//! time in Unix milliseconds, shifted left 16 bits, with 16 random bits
//! below (two starts in one millisecond on different hosts still differ),
//! and above the last one this `state_dir` recorded (a wall clock that went
//! backwards on this host cannot make a restart look older). Routers let
//! only a larger incarnation supersede a smaller one.

use std::path::{Path, PathBuf};

use jvpn_proto::Incarnation;

/// File in `state_dir` holding the last incarnation started there.
pub const FILE: &str = "incarnation";

/// Why the incarnation could not be recorded.
#[derive(Debug, thiserror::Error)]
#[error("state_dir: cannot record the incarnation in {path}: {source}")]
pub struct IncarnationError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The incarnation for a start at `unix_ms`, above `last` (pure).
pub fn next(unix_ms: u64, random: u16, last: Option<u64>) -> Incarnation {
    let fresh = (unix_ms << 16) | u64::from(random);
    Incarnation(match last {
        // A record at the very end of the range is garbage: the clock orders.
        Some(l) if l >= fresh => l.checked_add(1).unwrap_or(fresh),
        _ => fresh,
    })
}

/// A new incarnation for this start; recorded in `state_dir` when there is
/// one (written to a temporary file, synced, then renamed, so a crash
/// leaves the old or the new value, never a torn one).
pub fn start(state_dir: Option<&Path>) -> Result<Incarnation, IncarnationError> {
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let random = rand::random::<u16>();
    let Some(dir) = state_dir else {
        return Ok(next(unix_ms, random, None));
    };
    let path = dir.join(FILE);
    let err = |source| IncarnationError {
        path: path.clone(),
        source,
    };
    // An unreadable or garbled record is ignored: the clock still orders.
    let last = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let inc = next(unix_ms, random, last);
    let tmp = dir.join(format!("{FILE}.tmp"));
    // On disk before it is used: after a power loss the record must not be
    // older than an incarnation routers and the store have already seen
    // (the file's bytes, then the rename in the directory).
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{}\n", inc.0).as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(err)?;
    // Some file systems (vboxsf, 9p) cannot sync a directory: the rename
    // stands, less surely, and the start goes on.
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(error = %e, "state_dir: the incarnation's rename could not be synced");
    }
    Ok(inc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_starts_are_larger_even_when_the_clock_went_back() {
        let a = next(1_000, 0xffff, None);
        let b = next(1_001, 0, None);
        assert!(b > a, "one millisecond later wins over any random bits");
        // The clock went back an hour: still above the recorded one.
        let c = next(1, 7, Some(b.0));
        assert_eq!(c.0, b.0 + 1);
    }

    #[test]
    fn the_state_dir_keeps_the_last_incarnation() {
        let dir = tempfile::tempdir().unwrap();
        let first = start(Some(dir.path())).unwrap();
        // A record from the future (a clock that was ahead): still above it.
        std::fs::write(dir.path().join(FILE), format!("{}\n", u64::MAX / 2)).unwrap();
        let second = start(Some(dir.path())).unwrap();
        assert_eq!(second.0, u64::MAX / 2 + 1);
        assert!(second > first);
        let recorded = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert_eq!(recorded.trim().parse::<u64>().unwrap(), second.0);
    }
}
