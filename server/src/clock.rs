//! The wall clock: Unix time for the routing log and the API's `created` fields, and the
//! seeds drawn from it for requests that give none.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time now, in seconds (0 for a clock set before 1970).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A sampling seed from the clock's nanoseconds, mixed with `salt` so that seeds drawn at the
/// same instant differ (the server salts with its request counter, `drllm generate` with its
/// process id). Only for requests that gave no seed: it is not reproducible by design.
pub fn random_seed(salt: u64) -> u32 {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    (n as u32) ^ (salt as u32).wrapping_mul(0x9E37_79B9)
}
