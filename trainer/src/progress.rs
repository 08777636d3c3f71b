//! Progress of long work on one stderr line: done/total, rate, ETA and a note.

use std::io::Write;
use std::time::{Duration, Instant};

/// A progress line, redrawn at most twice a second (and at the end).
pub struct Progress {
    what: &'static str,
    t0: Instant,
    last: Instant,
}

impl Progress {
    /// A line labelled `[what]`.
    pub fn new(what: &'static str) -> Self {
        let now = Instant::now();
        Progress {
            what,
            t0: now,
            last: now.checked_sub(Duration::from_secs(10)).unwrap_or(now),
        }
    }

    /// `done` of `total` finished; `extra` is shown after the ETA.
    pub fn tick(&mut self, done: usize, total: usize, extra: &str) {
        let now = Instant::now();
        if done < total && now.duration_since(self.last).as_millis() < 500 {
            return;
        }
        self.last = now;
        let el = self.t0.elapsed().as_secs_f64();
        let rate = done as f64 / el.max(1e-9);
        let eta = if done > 0 {
            total.saturating_sub(done) as f64 / rate
        } else {
            0.0
        };
        eprint!(
            "\r[{}] {done}/{total} ({:.1}%) {:.2}/s ETA {:02}:{:02}:{:02} {extra}   ",
            self.what,
            100.0 * done as f64 / total.max(1) as f64,
            rate,
            (eta as u64) / 3600,
            (eta as u64 / 60) % 60,
            (eta as u64) % 60
        );
        if done >= total {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    }
}
