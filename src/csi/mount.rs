//! What the node plugin does to the host: make and grow filesystems, mount
//! and unmount (choosing and attaching `/dev/nbdX` is in `crate::attach`).
//! Every external program is named here, so the container image can be
//! checked against this list.

use std::path::Path;
use std::process::Stdio;

/// Programs the node plugin runs (the container image must provide them).
pub const PROGRAMS: &[&str] =
    &["blkid", "mkfs.ext4", "mkfs.xfs", "fsck.ext4", "mount", "umount", "resize2fs", "xfs_growfs", "blockdev"];

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{cmd} failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// Run a program; its stderr becomes the error.
pub async fn run(cmd: &str, args: &[&str]) -> Result<String, MountError> {
    let out = tokio::process::Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| MountError::Command { cmd: cmd.to_string(), detail: e.to_string() })?;
    if !out.status.success() {
        let detail = format!(
            "{} ({})",
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status.code().map(|c| format!("exit {c}")).unwrap_or_else(|| "killed".into())
        );
        return Err(MountError::Command { cmd: format!("{cmd} {}", args.join(" ")), detail });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What blkid finds on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A filesystem (or another signature with a type) of this type.
    Type(String),
    /// Something else that is not nothing: a partition table, or more
    /// than one signature.
    Other(String),
    /// No signature blkid knows (or blkid could not read the device: it
    /// says the same).
    Nothing,
}

/// Probe a device (`blkid -p`, every signature, not the cache).
pub async fn probe(dev: &str) -> Result<Found, MountError> {
    match run("blkid", &["-p", "-o", "export", dev]).await {
        Ok(out) => Ok(parse_probe(&out)),
        // Exit 2: nothing found (or nothing read); exit 8: signatures that
        // contradict each other.
        Err(MountError::Command { detail, .. }) if detail.ends_with("(exit 2)") => Ok(Found::Nothing),
        Err(MountError::Command { detail, .. }) if detail.ends_with("(exit 8)") => {
            Ok(Found::Other("more than one signature".into()))
        }
        Err(e) => Err(e),
    }
}

fn parse_probe(out: &str) -> Found {
    let value = |key: &str| {
        out.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('=').map(str::to_string)).filter(|v| !v.is_empty())
    };
    match (value("TYPE"), value("PTTYPE")) {
        (Some(t), _) => Found::Type(t),
        (None, Some(pt)) => Found::Other(format!("a {pt} partition table")),
        (None, None) => Found::Other("a signature without a type".into()),
    }
}

pub async fn mkfs(dev: &str, fs: &str, options: &str) -> Result<(), MountError> {
    let opts: Vec<&str> = options.split_whitespace().collect();
    let mut args: Vec<&str> = match fs {
        "xfs" => vec!["-q"],
        _ => vec!["-q", "-F", "-E", "nodiscard"],
    };
    args.extend(opts);
    args.push(dev);
    run(if fs == "xfs" { "mkfs.xfs" } else { "mkfs.ext4" }, &args).await.map(|_| ())
}

/// What is mounted at `path` (the topmost mount, per
/// /proc/self/mountinfo): `(major:minor, filesystem type, mount options)`.
pub fn mounted_at(path: &Path) -> Option<(String, String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        (f.get(4).is_some_and(|m| unescape(m) == want)).then(|| {
            let fs = f.get(sep + 1).copied().unwrap_or_default();
            (f[2].to_string(), fs.to_string(), f.get(5).copied().unwrap_or_default().to_string())
        })
    })
}

/// Is a filesystem on the device `dev_t` (`major:minor`) mounted anywhere
/// in this mount namespace (per /proc/self/mountinfo)?
pub fn device_mounted(dev_t: &str) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    info.lines().any(|l| l.split(' ').nth(2) == Some(dev_t))
}

/// Is `path` a mount point (per /proc/self/mountinfo)?
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let target = path.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4).is_some_and(|m| unescape(m) == target))
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

pub async fn mount(source: &str, target: &Path, fs: Option<&str>, options: &[String]) -> Result<(), MountError> {
    let t = target.display().to_string();
    let opts = options.join(",");
    let mut args: Vec<&str> = Vec::new();
    if let Some(fs) = fs {
        args.extend(["-t", fs]);
    }
    if !opts.is_empty() {
        args.extend(["-o", &opts]);
    }
    args.extend([source, &t]);
    run("mount", &args).await.map(|_| ())
}

/// Options every stage mount of `fs` gets, besides the user's:
/// - xfs: `nouuid`, since a clone or restored volume carries its source's
///   UUID and xfs refuses to mount a second filesystem with the same one
///   (a clone mounted beside its source on one node);
/// - read-only: no journal replay (`norecovery` for xfs, `noload` for
///   ext4). A volume restored from a snapshot of a mounted filesystem is
///   crash-consistent, its journal needs recovery, and recovery needs to
///   write, which a read-only device refuses; the mount sees the state as
///   of the last journal commit.
pub fn stage_options(fs: &str, readonly: bool) -> Vec<String> {
    let mut opts = Vec::new();
    if fs == "xfs" {
        opts.push("nouuid".to_string());
    }
    if readonly {
        opts.push("ro".to_string());
        match fs {
            "xfs" => opts.push("norecovery".to_string()),
            "ext4" | "ext3" => opts.push("noload".to_string()),
            _ => {}
        }
    }
    opts
}

/// What a preen-mode check of an ext4 filesystem found.
#[derive(Debug, PartialEq, Eq)]
pub enum Preen {
    Clean,
    /// Problems were fixed (exit 1 or 2); the output says which.
    Fixed(String),
}

/// `fsck.ext4 -p` before an ext4 filesystem is mounted read-write, as a
/// boot would: replays the journal and fixes what needs no human. Exit 1
/// and 2 mean errors were corrected; 4 and above mean errors left
/// uncorrected (or an operational error), reported with fsck's output.
pub async fn preen_ext4(dev: &str) -> Result<Preen, MountError> {
    let cmd = "fsck.ext4";
    let out = tokio::process::Command::new(cmd)
        .args(["-p", dev])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| MountError::Command { cmd: cmd.to_string(), detail: e.to_string() })?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    match out.status.code() {
        Some(0) => Ok(Preen::Clean),
        Some(1 | 2) => Ok(Preen::Fixed(text.trim().to_string())),
        code => Err(MountError::Command {
            cmd: format!("{cmd} -p {dev}"),
            detail: format!(
                "the filesystem has errors a preen check cannot fix ({}); run fsck.ext4 on the volume by hand: {}",
                code.map(|c| format!("exit {c}")).unwrap_or_else(|| "killed".into()),
                text.trim()
            ),
        }),
    }
}

pub async fn umount(target: &Path) -> Result<(), MountError> {
    if !is_mountpoint(target) {
        return Ok(());
    }
    run("umount", &[&target.display().to_string()]).await.map(|_| ())
}

pub async fn grow_filesystem(dev: &str, mountpoint: &Path, fs: &str) -> Result<(), MountError> {
    match fs {
        "xfs" => run("xfs_growfs", &[&mountpoint.display().to_string()]).await.map(|_| ()),
        _ => run("resize2fs", &[dev]).await.map(|_| ()),
    }
}

/// (total, free, used) bytes and inodes of a mounted filesystem.
pub fn statvfs(path: &Path) -> Result<([u64; 3], [u64; 3]), MountError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| MountError::Io(path.display().to_string(), std::io::Error::other(e)))?;
    // SAFETY: statvfs writes into the struct we pass and reads the C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    if rc != 0 {
        return Err(MountError::Io(path.display().to_string(), std::io::Error::last_os_error()));
    }
    let bs = s.f_frsize as u64;
    let total = s.f_blocks as u64 * bs;
    let avail = s.f_bavail as u64 * bs;
    let used = total.saturating_sub(s.f_bfree as u64 * bs);
    let inodes = s.f_files as u64;
    let ifree = s.f_ffree as u64;
    Ok(([total, avail, used], [inodes, ifree, inodes.saturating_sub(ifree)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_export_is_read_for_type_and_partition_table() {
        assert_eq!(parse_probe("DEVNAME=/dev/nbd0\nUUID=x\nTYPE=ext4\nUSAGE=filesystem\n"), Found::Type("ext4".into()));
        assert_eq!(
            parse_probe("DEVNAME=/dev/nbd0\nPTUUID=y\nPTTYPE=gpt\n"),
            Found::Other("a gpt partition table".into())
        );
        assert_eq!(parse_probe("DEVNAME=/dev/nbd0\n"), Found::Other("a signature without a type".into()));
    }

    #[test]
    fn stage_options_per_filesystem() {
        assert_eq!(stage_options("ext4", false), Vec::<String>::new());
        assert_eq!(stage_options("xfs", false), ["nouuid"]);
        assert_eq!(stage_options("ext4", true), ["ro", "noload"]);
        assert_eq!(stage_options("xfs", true), ["nouuid", "ro", "norecovery"]);
    }
}
