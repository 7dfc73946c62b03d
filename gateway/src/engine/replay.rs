//! Sliding replay window over RESUME counters (RFC 6479 style).
//!
//! The bitmap has one spare 64-bit block beyond the window, so sliding forward
//! clears whole blocks and never shifts bits. Accepts each counter at most
//! once, counters out of order inside the window, and refuses everything at or
//! below `top - window`.

/// Largest supported window (bits); the policy validates against it.
pub const MAX_WINDOW: u32 = 256;
const BLOCKS: usize = (MAX_WINDOW as usize / 64) + 1;

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ReplayWindow {
    top: u64,
    window: u32,
    bits: [u64; BLOCKS],
}

/// Why a counter was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    /// Seen before.
    Duplicate,
    /// Older than the window (or zero: counters start at 1).
    TooOld,
}

impl ReplayWindow {
    pub fn new(window: u32) -> Self {
        Self {
            top: 0,
            window: window.clamp(1, MAX_WINDOW),
            bits: [0; BLOCKS],
        }
    }

    /// Highest counter accepted so far.
    pub fn top(&self) -> u64 {
        self.top
    }

    fn slot(counter: u64) -> (usize, u64) {
        let block = (counter / 64) as usize % BLOCKS;
        (block, 1u64 << (counter % 64))
    }

    /// Would `counter` be accepted? Changes nothing.
    pub fn check(&self, counter: u64) -> Result<(), Replay> {
        if counter == 0 {
            return Err(Replay::TooOld);
        }
        if counter > self.top {
            return Ok(());
        }
        if self.top - counter >= u64::from(self.window) {
            return Err(Replay::TooOld);
        }
        let (block, bit) = Self::slot(counter);
        if self.bits[block] & bit != 0 {
            Err(Replay::Duplicate)
        } else {
            Ok(())
        }
    }

    /// Records `counter`; call only after [`check`](Self::check) passed and
    /// the request was authenticated.
    pub fn record(&mut self, counter: u64) {
        if counter > self.top {
            let old_block = self.top / 64;
            let new_block = counter / 64;
            let clear = (new_block - old_block).min(BLOCKS as u64);
            for i in 1..=clear {
                self.bits[((old_block + i) % BLOCKS as u64) as usize] = 0;
            }
            self.top = counter;
        }
        let (block, bit) = Self::slot(counter);
        self.bits[block] |= bit;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(w: &mut ReplayWindow, c: u64) -> Result<(), Replay> {
        w.check(c)?;
        w.record(c);
        Ok(())
    }

    #[test]
    fn basic_cases() {
        let mut w = ReplayWindow::new(128);
        assert_eq!(accept(&mut w, 0), Err(Replay::TooOld));
        assert_eq!(accept(&mut w, 1), Ok(()));
        assert_eq!(accept(&mut w, 1), Err(Replay::Duplicate));
        assert_eq!(accept(&mut w, 200), Ok(()));
        assert_eq!(accept(&mut w, 73), Ok(()), "200-73 = 127 < 128: inside");
        assert_eq!(
            accept(&mut w, 72),
            Err(Replay::TooOld),
            "200-72 = 128: outside"
        );
        assert_eq!(accept(&mut w, 150), Ok(()));
        assert_eq!(accept(&mut w, 150), Err(Replay::Duplicate));
        // A jump far ahead clears everything.
        assert_eq!(accept(&mut w, 100_000), Ok(()));
        assert_eq!(accept(&mut w, 99_999), Ok(()));
        assert_eq!(accept(&mut w, 100_000), Err(Replay::Duplicate));
    }
}
