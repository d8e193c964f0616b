//! How many CPUs this process may use: the affinity mask, bounded by the cgroup CPU quota, so a
//! sidecar with `limits.cpu: 2` on a 64-core node runs 2 threads, not 64.
use std::fs;

/// CPUs available to the process, at least 1.
pub fn cpu_budget() -> usize {
    let affinity = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    match cgroup_quota_cpus() {
        Some(quota) => affinity.min(quota).max(1),
        None => affinity.max(1),
    }
}

/// The cgroup v2 `cpu.max` (or v1 cfs quota) rounded up to whole CPUs, if a quota is set.
fn cgroup_quota_cpus() -> Option<usize> {
    if let Ok(max) = fs::read_to_string("/sys/fs/cgroup/cpu.max") {
        return parse_cpu_max(&max);
    }
    let quota = fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").ok()?;
    let period = fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_period_us").ok()?;
    quota_to_cpus(quota.trim().parse().ok()?, period.trim().parse().ok()?)
}

fn parse_cpu_max(text: &str) -> Option<usize> {
    let mut parts = text.split_whitespace();
    let quota = parts.next()?;
    let period: i64 = parts.next()?.parse().ok()?;
    if quota == "max" {
        return None;
    }
    quota_to_cpus(quota.parse().ok()?, period)
}

fn quota_to_cpus(quota: i64, period: i64) -> Option<usize> {
    if quota <= 0 || period <= 0 {
        return None;
    }
    Some(((quota + period - 1) / period) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max_parsing() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("200000 100000\n"), Some(2));
        assert_eq!(parse_cpu_max("150000 100000"), Some(2));
        assert_eq!(parse_cpu_max("50000 100000"), Some(1));
        assert_eq!(parse_cpu_max("garbage"), None);
        assert!(cpu_budget() >= 1);
    }
}
