//! Sizes as people read them, in messages and tables; durations as crac records them.

use std::time::Duration;

/// `n` bytes: `100 B`, `512.0 KiB`, `3.0 GiB` (powers of 1024, one decimal).
///
/// ```
/// assert_eq!(crac_cli::units::bytes(100), "100 B");
/// assert_eq!(crac_cli::units::bytes(3 << 30), "3.0 GiB");
/// ```
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `d` in milliseconds, as the metadata's and the outcomes' timings record it.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
