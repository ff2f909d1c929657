//! Sizing the node plugin's memory budget: the dirty data and chunk cache
//! every staged volume shares (see `crate::volume::budget`).
//!
//! An explicit `--memory-budget` wins. Otherwise half of the container's
//! memory limit, leaving the other half to NBD request buffers, the
//! engine's indexes and the process itself: the limit the chart passes
//! from the downward API (`--memory-limit`), else the one cgroups enforce
//! (v2 `memory.max`, v1 `memory.limit_in_bytes`). Without any limit the
//! budget falls back to `--dirty-limit` plus `--cache-size`, shared by
//! all volumes. The budget is split half for dirty data, half for cache.

use std::path::Path;

/// What a cgroup memory limit file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupLimit {
    Bytes(u64),
    Unlimited,
}

/// cgroup v1 reports "no limit" as the largest page-aligned signed 64-bit
/// value (9223372036854771712); anything this large is no limit either.
const V1_UNLIMITED: u64 = 1 << 62;

/// Parse the content of `memory.max` (v2: bytes or "max") or
/// `memory.limit_in_bytes` (v1: bytes, huge for none).
pub fn parse_cgroup_limit(text: &str) -> Result<CgroupLimit, String> {
    let t = text.trim();
    if t == "max" {
        return Ok(CgroupLimit::Unlimited);
    }
    match t.parse::<u64>() {
        Ok(n) if n >= V1_UNLIMITED => Ok(CgroupLimit::Unlimited),
        Ok(0) => Err("a memory limit of 0 bytes".to_string()),
        Ok(n) => Ok(CgroupLimit::Bytes(n)),
        Err(_) => Err(format!("{t:?} is neither a number of bytes nor \"max\"")),
    }
}

/// The memory limit cgroups put on this process, read under `root`
/// (normally /sys/fs/cgroup): v2 first, then v1. `Ok(None)` when there is
/// none or neither file exists; `Err` names the file that says nonsense.
pub fn cgroup_memory_limit(root: &Path) -> Result<Option<u64>, String> {
    for file in [root.join("memory.max"), root.join("memory/memory.limit_in_bytes")] {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("{}: {e}", file.display())),
        };
        return match parse_cgroup_limit(&text) {
            Ok(CgroupLimit::Bytes(n)) => Ok(Some(n)),
            Ok(CgroupLimit::Unlimited) => Ok(None),
            Err(e) => Err(format!("{}: {e}", file.display())),
        };
    }
    Ok(None)
}

/// The node's budget in bytes (dirty + cache) and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sizing {
    pub total: u64,
    pub source: String,
    /// No limit was known: `total` is the fallback.
    pub fallback: bool,
}

/// Choose the budget: explicit, else half the container limit (given, else
/// from cgroups under `cgroup_root`), else `fallback`.
pub fn size_budget(explicit: Option<u64>, given_limit: Option<u64>, cgroup_root: &Path, fallback: u64) -> Sizing {
    if let Some(total) = explicit {
        return Sizing { total, source: "--memory-budget".into(), fallback: false };
    }
    if let Some(limit) = given_limit.filter(|l| *l > 0) {
        let source = format!("half of the container memory limit {limit} (--memory-limit)");
        return Sizing { total: limit / 2, source, fallback: false };
    }
    match cgroup_memory_limit(cgroup_root) {
        Ok(Some(limit)) => {
            Sizing { total: limit / 2, source: format!("half of the cgroup memory limit {limit}"), fallback: false }
        }
        Ok(None) => Sizing {
            total: fallback,
            source: "no memory limit: --dirty-limit plus --cache-size".into(),
            fallback: true,
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the container's memory limit; using --dirty-limit plus --cache-size");
            let source = format!("unreadable memory limit ({e}): --dirty-limit plus --cache-size");
            Sizing { total: fallback, source, fallback: true }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_limits_v1_v2_unlimited_and_garbage() {
        assert_eq!(parse_cgroup_limit("2147483648\n"), Ok(CgroupLimit::Bytes(2 << 30)));
        assert_eq!(parse_cgroup_limit("max\n"), Ok(CgroupLimit::Unlimited));
        assert_eq!(parse_cgroup_limit("9223372036854771712\n"), Ok(CgroupLimit::Unlimited));
        let e = parse_cgroup_limit("lots").expect_err("garbage");
        assert!(e.contains("\"lots\" is neither"), "{e}");
        assert!(parse_cgroup_limit("").is_err());
        assert!(parse_cgroup_limit("-5").is_err());
        assert!(parse_cgroup_limit("0").is_err());
    }

    #[test]
    fn budget_from_flag_given_limit_cgroup_v2_v1_or_fallback() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let fallback = 384 << 20;
        // No cgroup files at all: the fallback.
        assert!(size_budget(None, None, root, fallback).fallback);
        // v1.
        std::fs::create_dir(root.join("memory")).expect("mkdir");
        std::fs::write(root.join("memory/memory.limit_in_bytes"), "1073741824\n").expect("write");
        assert_eq!(size_budget(None, None, root, fallback).total, 512 << 20);
        // v2 is read first; "max" is no limit.
        std::fs::write(root.join("memory.max"), "max\n").expect("write");
        assert_eq!(size_budget(None, None, root, fallback).total, fallback);
        std::fs::write(root.join("memory.max"), "4294967296\n").expect("write");
        let s = size_budget(None, None, root, fallback);
        assert_eq!(s.total, 2 << 30);
        assert!(s.source.contains("cgroup"), "{s:?}");
        // Garbage: a clear reason, and the fallback.
        std::fs::write(root.join("memory.max"), "banana").expect("write");
        let e = cgroup_memory_limit(root).expect_err("garbage");
        assert!(e.contains("memory.max: \"banana\" is neither"), "{e}");
        let s = size_budget(None, None, root, fallback);
        assert_eq!(s.total, fallback);
        assert!(s.source.contains("banana"), "{s:?}");
        // A limit passed in beats cgroups; the flag beats everything.
        assert_eq!(size_budget(None, Some(2 << 30), root, fallback).total, 1 << 30);
        assert_eq!(size_budget(Some(100 << 20), Some(2 << 30), root, fallback).total, 100 << 20);
    }
}
