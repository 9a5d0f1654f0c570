//! Item 2: dispatch scaling. `Coordinator::simulate()` (a whole cycle: every
//! `before_checkpoint`, then every `after_restore`) over 1, 100 and 10,000 registered no-op
//! resources, with the default `Limits` (hooks on the coordinator's hook thread, started on
//! demand and reused across phases, under time limits) and with `Limits::unlimited()` (hooks
//! on the calling thread).

use std::time::Duration;

use crac_core::{from_fns, Coordinator, Limits, Registration};

use crate::procs::Res;
use crate::stats::{fmt_ratio, fmt_us, time, verdict, Report, Samples};
use crate::Ctx;

const SIZES: [usize; 3] = [1, 100, 10_000];

struct Row {
    limits: &'static str,
    n: usize,
    cycle: Samples,
    register_us: f64,
}

fn measure(n: usize, limits: Limits, budget: Duration, max_iter: usize) -> Res<(Samples, f64)> {
    let coordinator = Coordinator::new();
    coordinator.set_limits(limits);
    let (registrations, took): (Vec<Registration>, _) = time(|| {
        (0..n)
            .map(|i| {
                coordinator
                    .context()
                    .register(from_fns(format!("r{i}"), |_| Ok(()), |_| Ok(())))
            })
            .collect()
    });
    let register_us = took.as_secs_f64() * 1e6;
    // Warm-up, and a check that every hook ran.
    for _ in 0..3 {
        let report = coordinator.simulate().map_err(|e| e.to_string())?;
        if report.hooks().len() != 2 * n {
            return Err(format!(
                "{} hooks ran for {n} resources",
                report.hooks().len()
            ));
        }
    }
    let mut samples = Samples::new();
    let started = std::time::Instant::now();
    while samples.len() < max_iter && (samples.len() < 11 || started.elapsed() < budget) {
        let (result, took) = time(|| coordinator.simulate());
        result.map_err(|e| e.to_string())?;
        samples.push(took);
    }
    drop(registrations);
    Ok((samples, register_us))
}

pub(crate) fn run(ctx: &Ctx, report: &mut Report) -> Res<()> {
    report.section("2. Dispatch scaling: Coordinator::simulate()");
    let budget = Duration::from_millis(if ctx.quick { 300 } else { 2000 });
    let mut rows = Vec::new();
    for (name, limits) in [
        ("default (hook thread)", Limits::default()),
        ("unlimited (caller's thread)", Limits::unlimited()),
    ] {
        for n in SIZES {
            let (cycle, register_us) = measure(n, limits, budget, 20_000)?;
            rows.push(Row {
                limits: name,
                n,
                cycle,
                register_us,
            });
        }
    }
    report.line(&format!(
        "Method: a Coordinator with n no-op resources (from_fns), simulate() repeated for about \
         {} per case (at least 11 runs, after 3 warm-up runs); median and p90 of one whole cycle \
         (2n hooks). Per resource = median / n; marginal = (t(10,000) - t(100)) / 9,900.",
        fmt_us(budget.as_secs_f64() * 1e6)
    ));
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.limits.to_owned(),
                r.n.to_string(),
                r.cycle.len().to_string(),
                fmt_us(r.cycle.median()),
                fmt_us(r.cycle.p90()),
                fmt_us(r.cycle.median() / r.n as f64),
                fmt_us(r.register_us / r.n as f64),
            ]
        })
        .collect();
    report.table(
        &[
            "limits",
            "resources",
            "runs",
            "cycle median",
            "cycle p90",
            "per resource",
            "register, per resource",
        ],
        &table,
    );
    for name in ["default (hook thread)", "unlimited (caller's thread)"] {
        let of = |n: usize| {
            rows.iter()
                .find(|r| r.limits == name && r.n == n)
                .map(|r| r.cycle.median())
                .unwrap_or(f64::NAN)
        };
        let marginal = (of(10_000) - of(100)) / 9_900.0;
        let per_10k = of(10_000) / 10_000.0;
        let per_100 = of(100) / 100.0;
        let met = per_10k < 1.0;
        report.line(&format!(
            "{name}: fixed cost (1 resource) {}; per resource {} at 100, {} at 10,000 \
             (marginal {}; growth of the per-resource cost from 100 to 10,000: {}). \
             Target < 1 µs per resource: {}.",
            fmt_us(of(1)),
            fmt_us(per_100),
            fmt_us(per_10k),
            fmt_us(marginal),
            fmt_ratio(per_10k / per_100),
            verdict(met)
        ));
        report.verdict(
            &format!("2. per-resource cost at 10,000, {name}"),
            "< 1 µs",
            Some(met),
        );
    }
    Ok(())
}
