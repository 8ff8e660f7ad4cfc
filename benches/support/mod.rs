//! What the benchmarks share: settings from the environment, the machine
//! they ran on, a process's memory, and medians with their spread.
#![allow(dead_code)]

use std::process::Command;

/// `name` from the environment, or `default` when unset or unparsable.
pub fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A `/proc/<pid>/status` field in KiB (`VmHWM:`, `VmRSS:`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// What a command prints, trimmed; empty if it cannot run.
pub fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// utime + stime of a process, in microseconds.
pub fn cpu_us(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    // After the command: state is field 3, utime 14, stime 15 (1-based).
    let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    (ticks(14) + ticks(15)) * 1_000_000 / hz
}

/// Context switches (voluntary and not) of a process's live threads: a
/// count per call that a shared machine's drift does not move, where CPU
/// time and latency do.
pub fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.ends_with("ctxt_switches").then(|| value.trim().parse::<u64>().ok()).flatten()
                })
                .collect::<Vec<_>>()
        })
        .sum()
}

/// The CPU's model name.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The commit, CPU, core count and kernel a run is reported with.
pub fn machine() -> String {
    format!(
        "commit {}  cpu {} ({} cores)  kernel {}",
        command_line("git", &["rev-parse", "--short", "HEAD"]),
        cpu_model(),
        std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0),
        command_line("uname", &["-r"]),
    )
}

/// The median (upper, for an even count) of non-empty `values`.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// `min–max` of `values` with `decimals` digits.
pub fn spread(values: &[f64], decimals: usize) -> String {
    let (min, max) = values.iter().fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    format!("{min:.decimals$}–{max:.decimals$}")
}
