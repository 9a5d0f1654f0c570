//! Samples, medians and percentiles, and the report: every figure is printed as it is found
//! and also kept as markdown for `--out`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// Durations of repeated runs, in microseconds.
#[derive(Clone, Debug, Default)]
pub(crate) struct Samples {
    us: Vec<f64>,
}

impl Samples {
    pub(crate) fn new() -> Samples {
        Samples::default()
    }

    pub(crate) fn push(&mut self, d: Duration) {
        self.us.push(d.as_secs_f64() * 1e6);
    }

    pub(crate) fn push_us(&mut self, us: f64) {
        self.us.push(us);
    }

    pub(crate) fn len(&self) -> usize {
        self.us.len()
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.us.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    /// The q-quantile (0..=1), nearest rank; NaN when empty.
    pub(crate) fn quantile(&self, q: f64) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    }

    /// The median (mean of the two middle values for an even count); NaN when empty.
    pub(crate) fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    pub(crate) fn p90(&self) -> f64 {
        self.quantile(0.9)
    }

    /// A table row: `name`, the number of samples, the median, the least and the most.
    pub(crate) fn runs_row(&self, name: &str) -> Vec<String> {
        vec![
            name.to_owned(),
            self.len().to_string(),
            fmt_us(self.median()),
            fmt_us(self.min()),
            fmt_us(self.quantile(1.0)),
        ]
    }

    pub(crate) fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }
}

/// Times `f`.
pub(crate) fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let out = f();
    (out, started.elapsed())
}

/// A duration in microseconds, in the unit that reads best.
pub(crate) fn fmt_us(us: f64) -> String {
    if us.is_nan() {
        "-".to_owned()
    } else if us.abs() < 1.0 {
        format!("{:.0} ns", us * 1e3)
    } else if us.abs() < 1000.0 {
        format!("{us:.1} µs")
    } else if us.abs() < 1e6 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

pub(crate) fn fmt_ratio(r: f64) -> String {
    if r.is_nan() {
        "-".to_owned()
    } else {
        format!("{r:.2}x")
    }
}

/// "met" or "MISSED".
pub(crate) fn verdict(met: bool) -> String {
    if met { "met" } else { "MISSED" }.to_owned()
}

/// Everything the run found: printed as it goes, and kept as markdown.
#[derive(Default)]
pub(crate) struct Report {
    md: String,
    /// (item, target, verdict) for the summary.
    pub verdicts: Vec<(String, String, String)>,
}

impl Report {
    pub(crate) fn section(&mut self, title: &str) {
        println!("\n=== {title} ===");
        let _ = writeln!(self.md, "\n### {title}\n");
    }

    /// A paragraph.
    pub(crate) fn line(&mut self, text: &str) {
        println!("{text}");
        let _ = writeln!(self.md, "{text}\n");
    }

    /// A line only on the terminal (progress).
    pub(crate) fn note(&self, text: &str) {
        println!("  .. {text}");
    }

    /// A table: aligned columns on the terminal, a markdown table in the file.
    pub(crate) fn table(&mut self, headers: &[&str], rows: &[Vec<String>]) {
        let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
        for row in rows {
            for (i, cell) in row.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(cell.chars().count());
                }
            }
        }
        let line = |cells: Vec<&str>| {
            cells
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
                .collect::<Vec<_>>()
                .join("  ")
        };
        println!("{}", line(headers.to_vec()));
        for row in rows {
            println!("{}", line(row.iter().map(String::as_str).collect()));
        }
        let _ = writeln!(self.md, "| {} |", headers.join(" | "));
        let _ = writeln!(
            self.md,
            "|{}|",
            headers.iter().map(|_| "---").collect::<Vec<_>>().join("|")
        );
        for row in rows {
            let _ = writeln!(self.md, "| {} |", row.join(" | "));
        }
        self.md.push('\n');
    }

    /// Records a target and whether it was met, for the summary.
    pub(crate) fn verdict(&mut self, item: &str, target: &str, met: Option<bool>) {
        let v = match met {
            Some(m) => verdict(m),
            None => "not measured".to_owned(),
        };
        self.verdicts.push((item.to_owned(), target.to_owned(), v));
    }

    pub(crate) fn summary(&mut self) {
        self.section("Summary: targets");
        let rows: Vec<Vec<String>> = self
            .verdicts
            .iter()
            .map(|(a, b, c)| vec![a.clone(), b.clone(), c.clone()])
            .collect();
        self.table(&["figure", "target", "verdict"], &rows);
    }

    pub(crate) fn markdown(&self) -> &str {
        &self.md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_quantiles() {
        let mut s = Samples::new();
        for x in [5.0, 1.0, 3.0, 2.0, 4.0] {
            s.push_us(x);
        }
        assert_eq!(s.median(), 3.0);
        assert_eq!(s.p90(), 5.0);
        s.push_us(6.0);
        assert_eq!(s.median(), 3.5);
    }
}
