//! What the node plugin does to the host: make and grow filesystems, mount
//! and unmount (choosing and attaching `/dev/nbdX` is in `crate::attach`).
//! Every external program is named here, so the container image can be
//! checked against this list.

use std::path::Path;
use std::process::Stdio;

/// Programs the node plugin runs (the container image must provide them).
pub const PROGRAMS: &[&str] =
    &["blkid", "mkfs.ext4", "mkfs.xfs", "mount", "umount", "resize2fs", "xfs_growfs", "blockdev"];

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

/// The filesystem on a device, `None` when it holds none.
pub async fn filesystem(dev: &str) -> Result<Option<String>, MountError> {
    match run("blkid", &["-p", "-o", "value", "-s", "TYPE", dev]).await {
        Ok(out) => Ok(Some(out.trim().to_string()).filter(|s| !s.is_empty())),
        // blkid exits 2 when it finds nothing.
        Err(MountError::Command { detail, .. }) if detail.contains("exit 2") => Ok(None),
        Err(e) => Err(e),
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
