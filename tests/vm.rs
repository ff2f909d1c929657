//! Real kernels: a Debian kernel booted under QEMU attaches `s3blk serve`
//! with the kernel's NBD client (see tests/vm/run.sh and
//! ../shared/vm-testing.md). Software emulation: about 40 seconds.

mod common;

use std::process::Command;

fn vm_tools() -> bool {
    ["qemu-system-x86_64", "busybox", "cpio", "depmod", "modprobe", "nbd-client", "mkfs.ext4", "apt-get"]
        .iter()
        .all(|t| common::require_tool(t))
}

fn run_guest(script: &str) -> String {
    let root = common::repo_root();
    let out = Command::new(root.join("tests/vm/run.sh"))
        .arg(root.join("tests/vm").join(script))
        .arg(common::s3blk_bin())
        .arg("480")
        .output()
        .expect("run tests/vm/run.sh");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let steps: Vec<&str> = text.lines().filter(|l| l.contains("S3BLK-VM-")).collect();
    eprintln!("{}", steps.join("\n"));
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("S3BLK-VM-RESULT: PASS")),
        "guest scenario {script} failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn kernel_nbd_client_ext4_survives_detach_restart_and_reattach() {
    if !vm_tools() {
        return;
    }
    let out = run_guest("guest-nbd.sh");
    assert!(out.contains("trimmed"), "fstrim did not run");
}
