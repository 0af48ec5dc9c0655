//! Samples from `/proc`: resident memory and CPU time of a process, busy CPU time of the
//! machine, and the open-files limit.

use std::time::Instant;

use anyhow::bail;

/// Resident set size of `pid` in bytes.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Clock ticks per second (`USER_HZ`), the unit of the CPU times in `/proc`.
fn clock_ticks_per_second() -> Option<u64> {
    #[cfg(unix)]
    let ticks = rustix::param::clock_ticks_per_second();
    #[cfg(not(unix))]
    let ticks = 0;
    (ticks > 0).then_some(ticks)
}

/// CPU time in clock ticks to microseconds.
fn ticks_to_us(ticks: u64) -> Option<u64> {
    let per_second = clock_ticks_per_second()?;
    u64::try_from(u128::from(ticks) * 1_000_000 / u128::from(per_second)).ok()
}

/// User + system CPU time of `pid` (all threads), in microseconds.
fn cpu_us(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let mut f = after.split_whitespace();
    // After the command name: state is field 3; utime and stime are fields 14 and 15.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    ticks_to_us(utime + stime)
}

/// Busy CPU time of the whole machine (all cores), in microseconds.
fn machine_busy_us() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    let busy = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum::<u64>();
    ticks_to_us(busy)
}

/// CPU times at one instant, microseconds (`None` where they could not be read).
#[derive(Clone, Copy)]
pub(crate) struct CpuSample {
    /// When the sample was taken.
    pub(crate) at: Instant,
    /// The server process (with `--server-pid`).
    pub(crate) server_us: Option<u64>,
    /// This process.
    pub(crate) own_us: Option<u64>,
    /// The whole machine's busy time.
    pub(crate) machine_us: Option<u64>,
}

/// CPU use between two samples, in % of one core.
pub(crate) fn cpu_pct(
    a: &CpuSample,
    b: &CpuSample,
    f: impl Fn(&CpuSample) -> Option<u64>,
) -> Option<f64> {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    match (f(a), f(b)) {
        (Some(x), Some(y)) if secs > 0.0 => Some(y.saturating_sub(x) as f64 / 1e6 / secs * 100.0),
        _ => None,
    }
}

/// Samples the CPU times of the server (if `server` is known), this process and the machine.
pub(crate) fn cpu_sample(server: Option<u32>) -> CpuSample {
    CpuSample {
        at: Instant::now(),
        server_us: server.and_then(|p| cpu_us(&p.to_string())),
        own_us: cpu_us("self"),
        machine_us: machine_busy_us(),
    }
}

/// Soft and hard open-files limits of this process.
fn nofile_limits() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut f = line["Max open files".len()..].split_whitespace();
    let soft = f.next()?.parse().unwrap_or(u64::MAX);
    let hard = f.next()?.parse().unwrap_or(u64::MAX);
    Some((soft, hard))
}

/// Fails, telling what to run, if the soft open-files limit is too low for `needed` sockets.
pub(crate) fn check_nofile(needed: usize) -> anyhow::Result<()> {
    if let Some((soft, hard)) = nofile_limits() {
        let needed = needed as u64 + 64;
        if soft < needed {
            bail!(
                "{needed} open files are needed but the soft limit is {soft} (hard {hard}); \
                 run `ulimit -n {hard}` first"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_parsing() {
        assert!(cpu_us("self").is_some());
        assert!(rss_bytes(std::process::id()).is_some_and(|b| b > 0));
        assert!(nofile_limits().is_some());
    }

    #[test]
    fn cpu_times_use_the_clock_tick_rate() {
        let per_second = clock_ticks_per_second().expect("clock ticks per second");
        assert_eq!(ticks_to_us(per_second), Some(1_000_000));
        assert_eq!(ticks_to_us(0), Some(0));
    }
}
