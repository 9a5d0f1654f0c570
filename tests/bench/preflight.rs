//! Item 8: preflight, what pre-dump runs after the hooks, over a process holding 10, 1,000 and
//! 10,000 open descriptors (a third each: files, connected Unix socket pairs, established TCP
//! connections on loopback), both ways: a process with an agent tells its own descriptors
//! with its before-checkpoint reply (`Request::facts`), one without is read through `/proc`
//! (`crac_action::preflight::check`). Two cases: CRIU told to take connections
//! (`--tcp-established`), so the checkpoint goes through and nothing is listed, and CRIU's
//! defaults, which refuse the TCP connections (listed, with their addresses). Then its share
//! of a `crac checkpoint --leave-running` of the test target measured in the same run.

use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crac_action::preflight::{self, AgentFacts, CriuOptions, Policy};
use crac_protocol::client;
use crac_protocol::wire::{Lean, Reason, Request};

use crate::procs::{Proc, Res};
use crate::stats::{fmt_us, time, verdict, Report, Samples};
use crate::Ctx;

const SIZES: [usize; 3] = [10, 1_000, 10_000];

/// Opens about `n` descriptors in this process: files, Unix pairs and TCP connections.
fn open(n: usize) -> Res<Vec<OwnedFd>> {
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(n + 2);
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let mut kind = 0;
    while fds.len() < n {
        kind += 1;
        match kind % 3 {
            0 => fds.push(
                std::fs::File::open("/dev/null")
                    .map_err(|e| e.to_string())?
                    .into(),
            ),
            1 => {
                let (a, b) = UnixStream::pair().map_err(|e| e.to_string())?;
                fds.push(a.into());
                fds.push(b.into());
            }
            _ => {
                let client = TcpStream::connect(addr).map_err(|e| e.to_string())?;
                let (server, _) = listener.accept().map_err(|e| e.to_string())?;
                fds.push(client.into());
                fds.push(server.into());
            }
        }
    }
    Ok(fds)
}

/// The median wall time of `crac checkpoint --leave-running` of crac-test-target, in ms.
fn checkpoint_ms(ctx: &Ctx) -> Res<f64> {
    let dir = ctx.scratch.join("preflight-target");
    let mut cmd = std::process::Command::new(&ctx.bins.test_target);
    cmd.env("CRAC_TEST_DIR", &dir);
    // Appended to, as a service's log must be (crac warns otherwise).
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ctx.scratch.join("preflight-target.stderr"))
        .map_err(|e| e.to_string())?;
    let ready = dir.join("ready");
    let target = Proc::start_with(
        cmd,
        std::process::Stdio::null(),
        stderr,
        Duration::from_secs(10),
        || ready.exists(),
    )?;
    let store = ctx.scratch.join("preflight-store");
    let mut samples = Samples::new();
    for _ in 0..if ctx.quick { 3 } else { 7 } {
        let (status, took) = crate::procs::run_timed(
            std::process::Command::new(&ctx.bins.crac)
                .arg("--store")
                .arg(&store)
                .args(["checkpoint", &target.pid.to_string(), "--name", "pf"])
                .args(["--replace", "--leave-running"])
                .stdout(std::process::Stdio::null()),
        )?;
        if !status.success() {
            target.kill();
            return Err(format!("crac checkpoint --leave-running failed ({status})"));
        }
        samples.push(took);
    }
    target.kill();
    Ok(samples.median() / 1e3)
}

/// With this process's agent: the before-checkpoint round trip with the facts and the
/// preflight on them with `opts`, and the same round trip without facts, in pairs; each
/// cycle is ended with an after-restore. Returns the medians (µs) and how many it would
/// refuse.
fn with_agent(
    socket: &std::path::Path,
    opts: &CriuOptions,
    budget: Duration,
) -> Res<(Samples, Samples, usize)> {
    let me = std::process::id();
    let (mut with, mut without) = (Samples::new(), Samples::new());
    let mut listed = 0;
    let started = Instant::now();
    let mut cycle = 0u64;
    while with.len() < 5 || (started.elapsed() < budget && with.len() < 1000) {
        for facts in [true, false] {
            cycle += 1;
            let token = format!("bench-{cycle}");
            // As pre-dump asks.
            let mut request = Request::before_checkpoint(&token).with_facts(facts);
            if facts {
                request = request.with_lean(Lean {
                    tcp_addresses: preflight::needs_tcp_addresses(opts, &Policy::default()),
                });
            }
            let (reply, took) = time(|| -> Res<usize> {
                let reply = client::request_at(socket, &request, Duration::from_secs(10))
                    .map_err(|e| e.to_string())?;
                let Some(told) = reply.facts else {
                    return Ok(0);
                };
                let told: AgentFacts = [(me, told)].into();
                Ok(preflight::problems(&[me], &told, opts, &Policy::default()).len())
            });
            let found = reply?;
            client::request_at(
                socket,
                &Request::after_restore(Reason::Aborted, Some(token)),
                Duration::from_secs(10),
            )
            .map_err(|e| e.to_string())?;
            if facts {
                listed = found;
                with.push(took);
            } else {
                without.push(took);
            }
        }
    }
    Ok((with, without, listed))
}

/// Through `/proc`, as for a process without an agent: `preflight::check` on this process
/// with `opts`, for about `budget`. Returns the times and how many it would refuse.
fn through_proc(opts: &CriuOptions, budget: Duration) -> (Samples, usize) {
    let me = std::process::id();
    let mut samples = Samples::new();
    let started = Instant::now();
    let mut listed = 0;
    while samples.len() < 5 || (started.elapsed() < budget && samples.len() < 1000) {
        let (refusal, took) = time(|| preflight::check(me, opts, &Policy::default()));
        listed = refusal.map_or(0, |r| r.matches("; pid ").count() + 1);
        samples.push(took);
    }
    (samples, listed)
}

pub(crate) fn run(ctx: &Ctx, report: &mut Report) -> Res<()> {
    report.section("8. Preflight: what CRIU would refuse, per descriptor count");
    // An agent of this process's own, with no resources: its round trip is pre-dump's.
    let agent = crac_agent::Builder::new()
        .coordinator(crac_core::Coordinator::new())
        .base_dir(ctx.scratch.join("preflight-agent"))
        .signal_cleanup(false)
        .socket_check(None)
        .start()
        .map_err(|e| e.to_string())?;
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_err(|e| e.to_string())?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
        .map_err(|e| format!("raising the descriptor limit to {hard}: {e}"))?;
    let budget = Duration::from_millis(if ctx.quick { 300 } else { 1500 });
    let defaults = CriuOptions::defaults();
    let taking = CriuOptions {
        tcp_established: true,
        ..CriuOptions::defaults()
    };
    let mut rows = Vec::new();
    let mut at_1000 = None;
    for n in SIZES {
        let fds = open(n)?;
        let held = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
        let mut costs = Vec::new();
        let mut refused = 0;
        let mut plain = Samples::new();
        let mut proc = Samples::new();
        for opts in [&taking, &defaults] {
            let (proc_samples, listed) = through_proc(opts, budget);
            let (with, without, told) = with_agent(agent.socket_path(), opts, budget)?;
            if told != listed {
                return Err(format!(
                    "at {n}: the agent's facts give {told} problems, /proc gives {listed}"
                ));
            }
            costs.push(with.median() - without.median());
            refused = listed;
            plain = without;
            proc = proc_samples;
        }
        drop(fds);
        if n == 1_000 {
            at_1000 = Some(costs[0]);
        }
        rows.push(vec![
            n.to_string(),
            held.to_string(),
            fmt_us(costs[0]),
            fmt_us(costs[0] / held as f64),
            fmt_us(costs[1]),
            refused.to_string(),
            fmt_us(plain.median()),
            fmt_us(proc.median()),
            fmt_us(proc.p90()),
            fmt_us(proc.median() / held as f64),
        ]);
    }
    agent.stop();
    report.line(&format!(
        "Method: this process opens n descriptors (a third /dev/null, a third connected Unix \
         socket pairs, a third established loopback TCP connections, both ends) and runs an \
         agent with no resources. With the agent (what pre-dump does for a process that runs \
         one): a before-checkpoint asking for the facts (the agent fstat's each descriptor \
         and asks each socket TCP_INFO, in its own process, in the pass that also counts its \
         TCP connections for RestoreInfo::tcp) plus the preflight on them, against the same \
         round trip without facts (which still counts the connections), in pairs for about \
         {budget} (at least 5 pairs); the cost is the difference of the medians. Two cases: \
         CRIU taking connections (--tcp-established: the checkpoint goes through, nothing is \
         listed), and CRIU's defaults, which refuse the TCP connections (listed with their \
         addresses: two more calls each). Without an agent: preflight::check on this process \
         (CRIU's defaults) for about {budget}: every /proc/PID/fd link, each socket through a \
         copy of its descriptor (pidfd_getfd). Both then ask sock_diag which sockets are \
         connected Unix ones, and to whom. The listings agree both ways (checked).",
        budget = fmt_us(budget.as_secs_f64() * 1e6)
    ));
    report.table(
        &[
            "n",
            "descriptors held",
            "with an agent, goes through",
            "per descriptor",
            "with an agent, refused",
            "listed",
            "(round trip without facts)",
            "through /proc: median",
            "p90",
            "per descriptor",
        ],
        &rows,
    );
    let at_1000 = at_1000.unwrap_or(f64::NAN);
    let met = at_1000 < 1000.0;
    let ms = checkpoint_ms(ctx)?;
    let share = format!(
        " That is {:.2} % of a median `crac checkpoint --leave-running` of the test target \
         ({ms:.1} ms, measured just now).",
        at_1000 / 10.0 / ms
    );
    report.line(&format!(
        "At 1,000 descriptors, with an agent, for a checkpoint that goes through: {}. Target \
         under 1 ms: {}.{share}",
        fmt_us(at_1000),
        verdict(met)
    ));
    report.verdict("8. preflight at 1,000 descriptors", "< 1 ms", Some(met));
    Ok(())
}
