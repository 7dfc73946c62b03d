//! Freed heap pages given back to the kernel once a burst of stream
//! traffic is over.
//!
//! glibc keeps the pages of buffers freed in the middle of its arenas: a
//! bulk transfer's transient buffers (TLS records, frames, reads) end up as
//! free memory the process still holds, so a reader that stopped looked
//! twice as expensive as the bytes held for it (docs/benchmarks.md,
//! "Memory"). `malloc_trim` returns whole free pages, but it walks the free
//! lists under each arena's lock (up to tens of ms on a fragmented heap of
//! a million sessions), so it runs only when channel bytes stopped moving
//! after they moved, and at most once per [`MIN_GAP`]: a busy process
//! reuses its free memory anyway, an idle one trims once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Channel payload bytes this process sent or received.
static MOVED: AtomicU64 = AtomicU64::new(0);

/// How often the reclaimer looks at [`MOVED`].
pub const CHECK: Duration = Duration::from_secs(1);

/// The least time between two trims.
pub const MIN_GAP: Duration = Duration::from_secs(10);

/// Counts channel payload bytes (one relaxed add per frame).
pub fn note_moved(n: usize) {
    MOVED.fetch_add(n as u64, Ordering::Relaxed);
}

/// Whether to trim now: bytes moved since the last look (`busy`), none
/// moved in this look, and the last trim at least [`MIN_GAP`] ago.
#[derive(Debug, Default)]
pub struct Quiet {
    seen: u64,
    busy: bool,
    last: Option<Instant>,
}

impl Quiet {
    /// One look at the byte count `moved` at `now`.
    pub fn look(&mut self, moved: u64, now: Instant) -> bool {
        if moved != self.seen {
            self.seen = moved;
            self.busy = true;
            return false;
        }
        let due = self.last.is_none_or(|t| now >= t + MIN_GAP);
        if self.busy && due {
            self.busy = false;
            self.last = Some(now);
            return true;
        }
        false
    }
}

/// Gives free heap pages back to the kernel (glibc; elsewhere nothing).
#[allow(unsafe_code)]
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer and only walks the allocator's
    // own free lists, under its own locks.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Trims after each burst of channel traffic until dropped; `done` hears
/// how long each trim took. Needs a tokio runtime.
pub fn reclaim_after_bursts(done: impl Fn(Duration) + Send + 'static) -> Reclaimer {
    Reclaimer(tokio::spawn(async move {
        let mut quiet = Quiet::default();
        let mut tick = tokio::time::interval(CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if quiet.look(MOVED.load(Ordering::Relaxed), Instant::now()) {
                // Off the async workers: a large heap's walk can take
                // milliseconds.
                let t = Instant::now();
                if tokio::task::spawn_blocking(trim).await.is_ok() {
                    done(t.elapsed());
                }
            }
        }
    }))
}

/// The reclaimer's task; stops when dropped.
#[derive(Debug)]
pub struct Reclaimer(tokio::task::JoinHandle<()>);

impl Drop for Reclaimer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_when_traffic_stops_and_not_again_until_it_moves() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut q = Quiet::default();
        assert!(!q.look(0, at(0)), "nothing moved yet");
        assert!(!q.look(10, at(1)), "moving");
        assert!(!q.look(20, at(2)), "moving");
        assert!(q.look(20, at(3)), "stopped after moving");
        assert!(!q.look(20, at(4)), "still quiet: trimmed already");
        assert!(!q.look(30, at(5)), "moving again");
        assert!(!q.look(30, at(6)), "quiet, but within the gap");
        assert!(q.look(30, at(13)), "quiet, gap over");
    }
}
