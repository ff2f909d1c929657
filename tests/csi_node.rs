//! The CSI node service with a real kernel: inside a QEMU VM (see
//! tests/vm/run.sh), `s3blk csi --mode all` stages volumes through
//! the kernel's NBD client, makes ext4 and xfs filesystems, publishes them,
//! expands them online, keeps I/O going across a plugin restart, moves them
//! to another node id, and hands out raw block devices. Two more scenarios
//! run the plugin as Kubernetes would: in a network namespace of its own
//! (a pod without hostNetwork; before Linux 6.4 the kernel's nbd netlink
//! family is not reachable there), and with the arguments and network
//! namespace the chart's node DaemonSet ships.
//! On the host the test boots the VM; inside it, the same binary drives
//! the plugin over gRPC.

mod common;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use s3blk::csi::pb;
use s3blk::csi::pb::controller_client::ControllerClient;
use s3blk::csi::pb::node_client::NodeClient;
use tonic::Code;
use tonic::transport::Channel;

#[test]
fn node_stage_publish_expand_restart_block_in_a_vm() {
    let tools = ["qemu-system-x86_64", "busybox", "cpio", "depmod", "modprobe", "nbd-client", "mkfs.xfs", "blkid"];
    if !tools.iter().all(|t| common::require_tool(t)) {
        return;
    }
    let root = common::repo_root();
    let me = std::env::current_exe().expect("test binary path");
    let out = Command::new(root.join("tests/vm/run.sh"))
        .arg(root.join("tests/vm/guest-csi.sh"))
        .arg(common::s3blk_bin())
        .arg("900")
        .arg(me)
        .output()
        .expect("run the VM");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let steps: Vec<&str> = text.lines().filter(|l| l.contains("STEP") || l.contains("S3BLK-VM")).collect();
    eprintln!("{}", steps.join("\n"));
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("S3BLK-VM-RESULT: PASS")),
        "node lifecycle in the VM failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Plugin {
    child: Child,
    sock: PathBuf,
}

fn work() -> PathBuf {
    PathBuf::from(std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into()))
}

fn start_plugin(node_id: &str) -> Plugin {
    let w = work();
    let args: Vec<String> = vec![
        "csi".into(),
        "--mode=all".into(),
        format!("--node-id={node_id}"),
        format!("--store=file://{}", w.join("store").display()),
        format!("--state-dir={}", w.join("state").display()),
    ];
    spawn_plugin(&args, &w.join("csi.sock"), false, None)
}

/// Start `s3blk <args> --endpoint=unix://<sock>`, in a network namespace
/// of its own when `own_netns` (as in a pod without hostNetwork), its log
/// appended to `log` when given.
fn spawn_plugin(args: &[String], sock: &Path, own_netns: bool, log: Option<&Path>) -> Plugin {
    spawn_plugin_with(args, sock, own_netns, log, &[])
}

/// [`spawn_plugin`] with `env` set for the plugin.
fn spawn_plugin_with(
    args: &[String],
    sock: &Path,
    own_netns: bool,
    log: Option<&Path>,
    env: &[(&str, String)],
) -> Plugin {
    let bin = std::env::var("S3BLK_BIN").expect("S3BLK_BIN");
    let mut cmd = if own_netns {
        let mut c = Command::new("unshare");
        c.arg("--net").arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.args(args).arg(format!("--endpoint=unix://{}", sock.display())).env("S3BLK_LOG", "info");
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    if let Some(log) = log {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("plugin log");
        cmd.stderr(f.try_clone().expect("dup log")).stdout(f);
    }
    let child = cmd.spawn().expect("start plugin");
    // A restarted plugin serves its staged volumes before it listens: under
    // software emulation on a busy host that took over 10 s.
    for _ in 0..1200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Plugin { child, sock: sock.to_path_buf() }
}

/// Prints a plugin log when the test fails, so the VM's console has it.
struct LogOnPanic(PathBuf);

impl Drop for LogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- plugin log {} ---\n{}",
                self.0.display(),
                std::fs::read_to_string(&self.0).unwrap_or_default()
            );
        }
    }
}

impl Plugin {
    fn stop(mut self) {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        let st = self.child.wait().expect("wait");
        assert!(st.success(), "plugin exited with {st:?}");
    }
}

async fn clients(sock: &Path) -> (ControllerClient<Channel>, NodeClient<Channel>) {
    let channel = common::grpc_channel(sock).await;
    (ControllerClient::new(channel.clone()), NodeClient::new(channel))
}

fn step(s: &str) {
    println!("S3BLK-VM-STEP: {s}");
}

fn mount_cap(fs: &str) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Mount(pb::volume_capability::MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
        access_mode: Some(pb::volume_capability::AccessMode {
            mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

fn block_cap() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Block(pb::volume_capability::BlockVolume {})),
        access_mode: Some(pb::volume_capability::AccessMode {
            mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

async fn create(ctl: &mut ControllerClient<Channel>, name: &str, size: i64, cap: pb::VolumeCapability) -> String {
    let r = ctl
        .create_volume(pb::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(pb::CapacityRange { required_bytes: size, limit_bytes: 0 }),
            volume_capabilities: vec![cap],
            ..Default::default()
        })
        .await
        .expect("create volume");
    r.into_inner().volume.expect("volume").volume_id
}

async fn publish_ctl(ctl: &mut ControllerClient<Channel>, id: &str, node: &str, cap: &pb::VolumeCapability) {
    ctl.controller_publish_volume(pb::ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .expect("controller publish");
}

async fn unpublish_ctl(ctl: &mut ControllerClient<Channel>, id: &str, node: &str) {
    ctl.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        ..Default::default()
    })
    .await
    .expect("controller unpublish");
}

fn stage_req(id: &str, staging: &Path, cap: &pb::VolumeCapability) -> pb::NodeStageVolumeRequest {
    pb::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    }
}

fn publish_req(id: &str, staging: &Path, target: &Path, cap: &pb::VolumeCapability) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    }
}

async fn unstage(node: &mut NodeClient<Channel>, id: &str, staging: &Path, target: &Path) {
    node.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    })
    .await
    .expect("unpublish");
    let req = pb::NodeUnstageVolumeRequest { volume_id: id.into(), staging_target_path: staging.display().to_string() };
    node.node_unstage_volume(req.clone()).await.expect("unstage");
    node.node_unstage_volume(req).await.expect("unstage is idempotent");
}

fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn write_files(dir: &Path, tag: &str, n: usize) -> HashMap<PathBuf, Vec<u8>> {
    let mut files = HashMap::new();
    for i in 0..n {
        let p = dir.join(format!("{tag}-{i}.bin"));
        let data = common::pattern(i as u64 + tag.len() as u64, 50_000 + i * 1000);
        std::fs::write(&p, &data).expect("write file");
        files.insert(p, data);
    }
    sync();
    files
}

fn check_files(files: &HashMap<PathBuf, Vec<u8>>, from: &Path, to: &Path) {
    for (p, data) in files {
        let moved = to.join(p.strip_prefix(from).expect("under dir"));
        assert_eq!(&std::fs::read(&moved).expect("read back"), data, "{}", moved.display());
    }
}

async fn volume_stats(node: &mut NodeClient<Channel>, id: &str, target: &Path) -> pb::NodeGetVolumeStatsResponse {
    let req = pb::NodeGetVolumeStatsRequest {
        volume_id: id.to_string(),
        volume_path: target.display().to_string(),
        staging_target_path: String::new(),
    };
    node.node_get_volume_stats(req).await.expect("stats").into_inner()
}

fn bytes_total(stats: &pb::NodeGetVolumeStatsResponse) -> i64 {
    stats.usage.iter().find(|u| u.unit == pb::volume_usage::Unit::Bytes as i32).map(|u| u.total).unwrap_or(0)
}

/// Runs only inside the VM (S3BLK_IN_VM=1): needs root, /dev/nbd*, mkfs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs inside the VM started by node_stage_publish_expand_restart_block_in_a_vm"]
async fn node_lifecycle_inside_vm() {
    assert_eq!(std::env::var("S3BLK_IN_VM").as_deref(), Ok("1"), "only inside the VM");
    let w = work();
    let plugin = start_plugin("node-1");
    let (mut ctl, mut node) = clients(&plugin.sock).await;
    let info = node.node_get_info(pb::NodeGetInfoRequest {}).await.expect("info").into_inner();
    assert_eq!(info.node_id, "node-1");

    step("bad requests change nothing");
    let ext4 = mount_cap("ext4");
    let id = create(&mut ctl, "pvc-ext4", 256 << 20, ext4.clone()).await;
    let staging = w.join("staging/ext4");
    let target = w.join("pods/a/ext4");
    let a_file = w.join("not-a-dir");
    std::fs::write(&a_file, b"x").expect("file");
    fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
        r.expect_err("must fail").code()
    }
    assert_eq!(code(node.node_stage_volume(stage_req(&id, &a_file, &ext4)).await), Code::FailedPrecondition);
    assert_eq!(code(node.node_stage_volume(stage_req("", &staging, &ext4)).await), Code::InvalidArgument);
    assert_eq!(code(node.node_stage_volume(stage_req(&id, Path::new(""), &ext4)).await), Code::InvalidArgument);
    assert_eq!(code(node.node_stage_volume(stage_req("garbage", &staging, &ext4)).await), Code::NotFound);
    assert_eq!(
        code(node.node_publish_volume(publish_req(&id, &staging, &target, &ext4)).await),
        Code::FailedPrecondition
    );
    assert!(
        s3blk::attach::devices::nbd_devices().iter().all(|d| s3blk::attach::devices::device_size(d) == 0),
        "a device stayed attached"
    );

    step("ext4: stage (mkfs), publish, write files");
    publish_ctl(&mut ctl, &id, "node-1", &ext4).await;
    node.node_stage_volume(stage_req(&id, &staging, &ext4)).await.expect("stage");
    node.node_stage_volume(stage_req(&id, &staging, &ext4)).await.expect("stage is idempotent");
    let dev = mounted_device(&staging);
    step("a staging path that lost its mount: publish refuses, stage mounts it again");
    let st = Command::new("umount").arg(&staging).status().expect("umount");
    assert!(st.success());
    assert_eq!(
        code(node.node_publish_volume(publish_req(&id, &staging, &target, &ext4)).await),
        Code::FailedPrecondition,
        "publish bind-mounted an unmounted staging directory"
    );
    node.node_stage_volume(stage_req(&id, &staging, &ext4)).await.expect("stage again");
    assert_eq!(mounted_device(&staging), dev, "stage did not mount the volume's device again");
    node.node_publish_volume(publish_req(&id, &staging, &target, &ext4)).await.expect("publish");
    node.node_publish_volume(publish_req(&id, &staging, &target, &ext4)).await.expect("publish is idempotent");
    let files = write_files(&target, "first", 20);
    let stats = volume_stats(&mut node, &id, &target).await;
    let before = bytes_total(&stats);
    assert!(before > 200 << 20 && stats.usage.len() == 2, "{stats:?}");
    assert_eq!(stats.volume_condition.as_ref().map(|c| c.abnormal), Some(false));

    step("expand online: 256 MiB -> 512 MiB, ext4 grows while mounted");
    let r = ctl
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(pb::CapacityRange { required_bytes: 512 << 20, limit_bytes: 0 }),
            volume_capability: Some(ext4.clone()),
            ..Default::default()
        })
        .await
        .expect("controller expand")
        .into_inner();
    assert!(r.node_expansion_required);
    let r = node
        .node_expand_volume(pb::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            capacity_range: Some(pb::CapacityRange { required_bytes: 512 << 20, limit_bytes: 0 }),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(ext4.clone()),
            secrets: HashMap::new(),
        })
        .await
        .expect("node expand")
        .into_inner();
    assert_eq!(r.capacity_bytes, 512 << 20);
    let stats = volume_stats(&mut node, &id, &target).await;
    assert!(bytes_total(&stats) > before + (200 << 20), "filesystem did not grow: {before} -> {stats:?}");

    step("plugin restart with the volume mounted: I/O keeps working");
    drop((ctl, node));
    plugin.stop();
    // While the plugin is away the kernel holds I/O; a writer started now
    // completes once the new plugin has reconnected the device.
    let pending = {
        let target = target.clone();
        std::thread::spawn(move || write_files(&target, "during-restart", 3))
    };
    std::thread::sleep(Duration::from_secs(2));
    let plugin = start_plugin("node-1");
    let (mut ctl, mut node) = clients(&plugin.sock).await;
    let during = pending.join().expect("writer thread");
    let more = write_files(&target, "after-restart", 5);
    check_files(&files, &target, &target);
    check_files(&during, &target, &target);
    check_files(&more, &target, &target);

    step("unpublish, unstage; stage again as another node: files verify");
    unstage(&mut node, &id, &staging, &target).await;
    unpublish_ctl(&mut ctl, &id, "node-1").await;
    drop((ctl, node));
    plugin.stop();
    let plugin = start_plugin("node-2");
    let (mut ctl, mut node) = clients(&plugin.sock).await;
    publish_ctl(&mut ctl, &id, "node-2", &ext4).await;
    let target2 = w.join("pods/b/ext4");
    node.node_stage_volume(stage_req(&id, &staging, &ext4)).await.expect("stage on node-2");
    node.node_publish_volume(publish_req(&id, &staging, &target2, &ext4)).await.expect("publish on node-2");
    check_files(&files, &target, &target2);
    check_files(&more, &target, &target2);
    check_files(&during, &target, &target2);
    unstage(&mut node, &id, &staging, &target2).await;
    unpublish_ctl(&mut ctl, &id, "node-2").await;

    step("xfs: stage (mkfs.xfs), publish, write, unstage");
    let xfs = mount_cap("xfs");
    let xid = create(&mut ctl, "pvc-xfs", 512 << 20, xfs.clone()).await;
    let xstaging = w.join("staging/xfs");
    let xtarget = w.join("pods/c/xfs");
    publish_ctl(&mut ctl, &xid, "node-2", &xfs).await;
    node.node_stage_volume(stage_req(&xid, &xstaging, &xfs)).await.expect("stage xfs");
    node.node_publish_volume(publish_req(&xid, &xstaging, &xtarget, &xfs)).await.expect("publish xfs");
    let xfiles = write_files(&xtarget, "xfs", 10);
    unstage(&mut node, &xid, &xstaging, &xtarget).await;
    node.node_stage_volume(stage_req(&xid, &xstaging, &xfs)).await.expect("stage xfs again");
    node.node_publish_volume(publish_req(&xid, &xstaging, &xtarget, &xfs)).await.expect("publish xfs again");
    check_files(&xfiles, &xtarget, &xtarget);
    unstage(&mut node, &xid, &xstaging, &xtarget).await;

    step("raw block: no mkfs, the device itself at the target path");
    let block = block_cap();
    let bid = create(&mut ctl, "pvc-block", 64 << 20, block.clone()).await;
    let bstaging = w.join("staging/block");
    let btarget = w.join("pods/d/dev");
    publish_ctl(&mut ctl, &bid, "node-2", &block).await;
    node.node_stage_volume(stage_req(&bid, &bstaging, &block)).await.expect("stage block");
    node.node_publish_volume(publish_req(&bid, &bstaging, &btarget, &block)).await.expect("publish block");
    let data = common::pattern(99, 1 << 20);
    {
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&btarget).expect("open block target");
        f.seek(SeekFrom::Start(7 << 20)).expect("seek");
        f.write_all(&data).expect("write block");
        f.sync_all().expect("fsync block");
    }
    unstage(&mut node, &bid, &bstaging, &btarget).await;
    node.node_stage_volume(stage_req(&bid, &bstaging, &block)).await.expect("stage block again");
    node.node_publish_volume(publish_req(&bid, &bstaging, &btarget, &block)).await.expect("publish block again");
    {
        let mut f = std::fs::File::open(&btarget).expect("open");
        f.seek(SeekFrom::Start(7 << 20)).expect("seek");
        let mut back = vec![0u8; data.len()];
        f.read_exact(&mut back).expect("read block");
        assert!(back == data, "raw block data differs after re-stage");
    }
    unstage(&mut node, &bid, &bstaging, &btarget).await;

    step("a volume holding data but no filesystem is never formatted by a stage");
    let fs_staging = w.join("staging/block-as-ext4");
    let refused = node.node_stage_volume(stage_req(&bid, &fs_staging, &mount_cap("ext4"))).await;
    let e = refused.expect_err("a stage that would format a volume holding data");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("not formatted"), "{}", e.message());
    node.node_stage_volume(stage_req(&bid, &bstaging, &block)).await.expect("stage block after the refusal");
    node.node_publish_volume(publish_req(&bid, &bstaging, &btarget, &block)).await.expect("publish block");
    {
        let mut f = std::fs::File::open(&btarget).expect("open");
        f.seek(SeekFrom::Start(7 << 20)).expect("seek");
        let mut back = vec![0u8; data.len()];
        f.read_exact(&mut back).expect("read block");
        assert!(back == data, "the refused stage changed the volume's data");
    }
    unstage(&mut node, &bid, &bstaging, &btarget).await;
    drop((ctl, node));
    plugin.stop();
    assert!(s3blk::attach::devices::nbd_devices().iter().all(|d| s3blk::attach::devices::device_size(d) == 0));
    step("done");
}

/// Linux before 6.4 offers the nbd netlink family only in the host's
/// network namespace.
fn netlink_only_in_host_netns() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) < (6, 4)
}

/// The device mounted at `path` (from /proc/self/mountinfo).
fn mounted_device(path: &Path) -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let target = path.display().to_string();
    info.lines()
        .filter(|l| l.split(' ').nth(4) == Some(target.as_str()))
        .find_map(|l| l.split(" - ").nth(1).and_then(|rest| rest.split(' ').nth(1)).map(str::to_string))
        .unwrap_or_else(|| panic!("nothing is mounted at {target}"))
}

/// Read the device's first block past the page cache; bounded, so a
/// device that hangs fails the test instead of the VM's time limit.
fn direct_read(dev: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dev = dev.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&dev).and_then(|mut f| {
            let layout = std::alloc::Layout::from_size_align(4096, 4096).expect("layout");
            // SAFETY: a 4096-byte buffer with 4096 alignment (O_DIRECT), freed below.
            let buf = unsafe { std::alloc::alloc_zeroed(layout) };
            // SAFETY: buf points to 4096 writable bytes.
            let r = f.read_exact(unsafe { std::slice::from_raw_parts_mut(buf, 4096) });
            // SAFETY: allocated above with this layout.
            unsafe { std::alloc::dealloc(buf, layout) };
            r
        });
        let _ = tx.send(r);
    });
    rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| Err(std::io::Error::other("read hung for 20 s")))
}

/// Every nbd device the kernel has, with its size in bytes.
fn nbd_sizes() -> Vec<(String, u64)> {
    s3blk::attach::devices::nbd_devices()
        .into_iter()
        .map(|d| {
            let size = s3blk::attach::devices::device_size(&d);
            (d, size)
        })
        .collect()
}

/// Poll until no nbd device has a size.
fn wait_all_detached(what: &str) {
    for _ in 0..200 {
        if nbd_sizes().iter().all(|(_, s)| *s == 0) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: devices still attached: {:?}", nbd_sizes());
}

/// Runs only inside the VM: the node plugin in a network namespace of its
/// own, as in a pod without hostNetwork. Before Linux 6.4 the kernel's nbd
/// netlink family is not reachable there and the plugin attaches through
/// the ioctl interface: stage, publish, expand online, two volumes staged
/// at once. A plugin restart then shows what that interface loses (the
/// device fails I/O; it is never handed to another volume) and how the
/// volume comes back (unstage, stage again: every synced file is there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs inside the VM started by node_stage_publish_expand_restart_block_in_a_vm"]
async fn node_in_its_own_network_namespace_inside_vm() {
    assert_eq!(std::env::var("S3BLK_IN_VM").as_deref(), Ok("1"), "only inside the VM");
    let w = work().join("netns");
    std::fs::create_dir_all(&w).expect("work dir");
    let log = w.join("plugin.log");
    let _dump = LogOnPanic(log.clone());
    let args: Vec<String> = vec![
        "csi".into(),
        "--mode=all".into(),
        "--node-id=node-ns".into(),
        format!("--store=file://{}", w.join("store").display()),
        format!("--state-dir={}", w.join("state").display()),
    ];
    let sock = w.join("csi.sock");
    let plugin = spawn_plugin(&args, &sock, true, Some(&log));
    let (mut ctl, mut node) = clients(&plugin.sock).await;
    let ioctl_expected = netlink_only_in_host_netns();

    step("own network namespace: stage (mkfs), publish, write files");
    let ext4 = mount_cap("ext4");
    let id = create(&mut ctl, "pvc-netns", 256 << 20, ext4.clone()).await;
    let (staging, target) = (w.join("staging"), w.join("pods/a"));
    publish_ctl(&mut ctl, &id, "node-ns", &ext4).await;
    node.node_stage_volume(stage_req(&id, &staging, &ext4)).await.expect("stage in a network namespace of its own");
    node.node_publish_volume(publish_req(&id, &staging, &target, &ext4)).await.expect("publish");
    let files = write_files(&target, "netns", 10);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if ioctl_expected {
        assert!(text.contains("interface=\"ioctl\""), "not attached through ioctls:\n{text}");
        assert!(
            text.contains("only in the host's network namespace")
                && text.contains("reconnecting after a plugin restart"),
            "the log does not say why ioctls are used and what is lost:\n{text}"
        );
    }

    step("own network namespace: expand online 256 MiB -> 512 MiB");
    let before = bytes_total(&volume_stats(&mut node, &id, &target).await);
    ctl.controller_expand_volume(pb::ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(pb::CapacityRange { required_bytes: 512 << 20, limit_bytes: 0 }),
        volume_capability: Some(ext4.clone()),
        ..Default::default()
    })
    .await
    .expect("controller expand");
    node.node_expand_volume(pb::NodeExpandVolumeRequest {
        volume_id: id.clone(),
        volume_path: target.display().to_string(),
        capacity_range: Some(pb::CapacityRange { required_bytes: 512 << 20, limit_bytes: 0 }),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(ext4.clone()),
        secrets: HashMap::new(),
    })
    .await
    .expect("node expand");
    let after = bytes_total(&volume_stats(&mut node, &id, &target).await);
    assert!(after > before + (200 << 20), "filesystem did not grow: {before} -> {after}");

    let more = write_files(&target, "netns-more", 5);

    step("own network namespace: two raw block volumes staged at once get two free devices");
    let block = block_cap();
    let mut staged = Vec::new();
    for name in ["pvc-netns-b1", "pvc-netns-b2"] {
        let bid = create(&mut ctl, name, 64 << 20, block.clone()).await;
        publish_ctl(&mut ctl, &bid, "node-ns", &block).await;
        staged.push((bid, w.join(format!("staging/{name}")), w.join(format!("pods/{name}/dev"))));
    }
    let (mut n1, mut n2) = (node.clone(), node.clone());
    let (r1, r2) = tokio::join!(
        n1.node_stage_volume(stage_req(&staged[0].0, &staged[0].1, &block)),
        n2.node_stage_volume(stage_req(&staged[1].0, &staged[1].1, &block)),
    );
    r1.expect("first concurrent stage");
    r2.expect("second concurrent stage");
    let mut rdevs = Vec::new();
    for (bid, bstaging, btarget) in &staged {
        node.node_publish_volume(publish_req(bid, bstaging, btarget, &block)).await.expect("publish block");
        use std::os::unix::fs::MetadataExt;
        rdevs.push(std::fs::metadata(btarget).expect("block target").rdev());
    }
    assert_ne!(rdevs[0], rdevs[1], "two volumes got the same device");
    for (bid, bstaging, btarget) in &staged {
        unstage(&mut node, bid, bstaging, btarget).await;
        unpublish_ctl(&mut ctl, bid, "node-ns").await;
    }

    if ioctl_expected {
        step("own network namespace: a plugin restart leaves the ioctl-attached device failing I/O");
        let dev = mounted_device(&staging);
        drop((ctl, node));
        plugin.stop();
        let read = direct_read(&dev);
        assert!(read.is_err(), "{dev} still reads after its plugin exited: {read:?}");
        let plugin = spawn_plugin(&args, &sock, true, Some(&log));
        let (mut ctl, mut node) = clients(&plugin.sock).await;
        // Recovery runs in the background, after the socket is up.
        let mut text = String::new();
        for _ in 0..600 {
            text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.matches("recovery of staged volumes finished").count() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            text.contains(&format!(
                "{dev} needs a new connection after the plugin restarted, which only netlink can give"
            )) && text.contains("Unstage and stage the volume again"),
            "the restarted plugin does not say why the device cannot come back and what to do:\n{text}"
        );
        step("own network namespace: the dead device is never handed to another volume");
        let other = create(&mut ctl, "pvc-netns-other", 64 << 20, block_cap()).await;
        let (ostaging, otarget) = (w.join("staging/other"), w.join("pods/other/dev"));
        publish_ctl(&mut ctl, &other, "node-ns", &block_cap()).await;
        node.node_stage_volume(stage_req(&other, &ostaging, &block_cap())).await.expect("stage another volume");
        node.node_publish_volume(publish_req(&other, &ostaging, &otarget, &block_cap())).await.expect("publish it");
        {
            use std::os::unix::fs::MetadataExt;
            let got = std::fs::metadata(&otarget).expect("block target").rdev();
            let dead = std::fs::metadata(&dev).expect("dead device").rdev();
            assert_ne!(got, dead, "the new volume got {dev}, which a stale filesystem still uses");
        }
        unstage(&mut node, &other, &ostaging, &otarget).await;
        unpublish_ctl(&mut ctl, &other, "node-ns").await;
        step("own network namespace: unstage and stage again bring the volume back");
        unstage(&mut node, &id, &staging, &target).await;
        node.node_stage_volume(stage_req(&id, &staging, &ext4)).await.expect("stage after the restart");
        node.node_publish_volume(publish_req(&id, &staging, &target, &ext4)).await.expect("publish after the restart");
        check_files(&files, &target, &target);
        check_files(&more, &target, &target);
        unstage(&mut node, &id, &staging, &target).await;
        unpublish_ctl(&mut ctl, &id, "node-ns").await;
        drop((ctl, node));
        plugin.stop();
    } else {
        step("own network namespace: unstage, stage again, files read back");
        unstage(&mut node, &id, &staging, &target).await;
        node.node_stage_volume(stage_req(&id, &staging, &ext4)).await.expect("stage again");
        node.node_publish_volume(publish_req(&id, &staging, &target, &ext4)).await.expect("publish again");
        check_files(&files, &target, &target);
        check_files(&more, &target, &target);
        unstage(&mut node, &id, &staging, &target).await;
        unpublish_ctl(&mut ctl, &id, "node-ns").await;
        drop((ctl, node));
        plugin.stop();
    }
    wait_all_detached("at the end");
    step("own network namespace: done");
}

/// The node DaemonSet of the rendered chart (deploy/s3blk.yaml, kept equal
/// to the chart by tests/chart): whether its pod uses the host's network
/// namespace, and the s3blk container's arguments.
fn chart_node_pod() -> (bool, Vec<String>) {
    let path = common::repo_root().join("deploy/s3blk.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/s3blk.yaml");
    let ds = text
        .split("\n---\n")
        .find(|d| d.lines().any(|l| l.trim() == "kind: DaemonSet"))
        .expect("deploy/s3blk.yaml has no DaemonSet");
    let host_network = ds.lines().any(|l| l.trim() == "hostNetwork: true");
    let lines: Vec<&str> = ds.lines().collect();
    let container = lines.iter().position(|l| l.trim() == "- name: s3blk").expect("no s3blk container");
    let args_at = (container..lines.len()).find(|&i| lines[i].trim() == "args:").expect("s3blk container has no args");
    let indent = |l: &str| l.len() - l.trim_start().len();
    let args = lines[args_at + 1..]
        .iter()
        .take_while(|l| indent(l) >= indent(lines[args_at]) && l.trim_start().starts_with("- "))
        .map(|l| l.trim_start().trim_start_matches("- ").trim().to_string())
        .collect();
    (host_network, args)
}

/// Runs only inside the VM: the node plugin with the arguments the chart's
/// DaemonSet gives it and in the network namespace its pod gets (the
/// host's, with hostNetwork). Stage, publish, write; restart the plugin
/// with I/O in flight: on this configuration the device is reconnected
/// (netlink) and every write lands, on every kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs inside the VM started by node_stage_publish_expand_restart_block_in_a_vm"]
async fn node_as_the_chart_ships_it_inside_vm() {
    assert_eq!(std::env::var("S3BLK_IN_VM").as_deref(), Ok("1"), "only inside the VM");
    let w = work().join("chart");
    std::fs::create_dir_all(&w).expect("work dir");
    let log = w.join("plugin.log");
    let _dump = LogOnPanic(log.clone());
    let (host_network, chart_args) = chart_node_pod();
    assert!(chart_args.first().map(String::as_str) == Some("csi") && chart_args.contains(&"--mode=node".into()));
    // What kubelet and the pod's mounts would provide: $(NODE_NAME), the
    // CSI socket (added by spawn_plugin), the host's state directory.
    let args: Vec<String> = chart_args
        .iter()
        .filter(|a| !a.starts_with("--endpoint="))
        .map(|a| {
            if a.starts_with("--state-dir=") {
                format!("--state-dir={}", w.join("state").display())
            } else {
                a.replace("$(NODE_NAME)", "chart-node")
            }
        })
        .collect();
    let vol = w.join("store/pvc-chart");
    let out = Command::new(std::env::var("S3BLK_BIN").expect("S3BLK_BIN"))
        .args(["volume", "create"])
        .arg(format!("file://{}", vol.display()))
        .args(["--size", "256MiB"])
        .output()
        .expect("s3blk volume create");
    assert!(out.status.success(), "volume create: {}", String::from_utf8_lossy(&out.stderr));
    let id = format!("file://{}", vol.display());
    // What ControllerPublish records (the chart's CSIDriver requires
    // attach): a restarted plugin serves only volumes published to it.
    std::fs::create_dir_all(vol.join("attachments")).expect("attachments dir");
    let a = serde_json::json!({ "node_id": "chart-node", "readonly": false, "created_unix": 0 });
    std::fs::write(vol.join("attachments/chart-node.json"), a.to_string()).expect("attachment record");
    let secrets: HashMap<String, String> = [
        ("accessKeyID".to_string(), "AKIDCHARTSECRET0003".to_string()),
        ("secretAccessKey".to_string(), "sk-chart-secret-value-0004".to_string()),
    ]
    .into();
    let no_secret_in = |p: &Path| {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        for v in secrets.values() {
            assert!(!text.contains(v.as_str()), "{} holds a stage secret", p.display());
        }
    };
    let sock = w.join("csi.sock");
    let plugin = spawn_plugin(&args, &sock, !host_network, Some(&log));
    let mut node = NodeClient::new(common::grpc_channel(&plugin.sock).await);

    step(&format!("as the chart ships it (hostNetwork: {host_network}): stage, publish, write"));
    let ext4 = mount_cap("ext4");
    let (staging, target) = (w.join("staging"), w.join("pods/a"));
    let mut req = stage_req(&id, &staging, &ext4);
    req.secrets = secrets.clone();
    node.node_stage_volume(req).await.expect("stage");
    for e in std::fs::read_dir(w.join("state")).expect("state dir").flatten() {
        no_secret_in(&e.path());
    }
    node.node_publish_volume(publish_req(&id, &staging, &target, &ext4)).await.expect("publish");
    let files = write_files(&target, "chart", 10);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("interface=\"netlink\""),
        "the chart's configuration did not attach through netlink:\n{text}"
    );

    step("as the chart ships it: plugin restart with I/O in flight, the device is reconnected");
    drop(node);
    plugin.stop();
    let pending = {
        let target = target.clone();
        std::thread::spawn(move || write_files(&target, "chart-during-restart", 3))
    };
    std::thread::sleep(Duration::from_secs(2));
    let plugin = spawn_plugin(&args, &sock, !host_network, Some(&log));
    let mut node = NodeClient::new(common::grpc_channel(&plugin.sock).await);
    let during = pending.join().expect("writer thread");
    check_files(&files, &target, &target);
    check_files(&during, &target, &target);
    unstage(&mut node, &id, &staging, &target).await;
    drop(node);
    plugin.stop();
    wait_all_detached("at the end");
    no_secret_in(&log);
    let left: Vec<_> =
        std::fs::read_dir("/run/s3blk").map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "stage secrets outlived the unstage: {left:?}");
    step("as the chart ships it: done");
}

// ------------------------------------------------------------------
// Node service on the host, without a kernel NBD client: the plugin
// recovers stage records written by the test (as a plugin that
// restarted would find them); no device can be attached here, so
// recovery serves the volume on its NBD socket only, which the test
// drives with its own NBD client.

/// A volume in a local store, and a node plugin's state directory that
/// says the volume was staged on `node-1` before a restart.
struct Restarted {
    dir: tempfile::TempDir,
    id: String,
    vol: PathBuf,
    socket: PathBuf,
    export: String,
}

impl Restarted {
    fn new(published_to: &[&str], legacy_secrets: Option<&HashMap<String, String>>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = dir.path().join("store/pvc-1");
        let out = Command::new(common::s3blk_bin())
            .args(["volume", "create"])
            .arg(format!("file://{}", vol.display()))
            .args(["--size", "64MiB"])
            .output()
            .expect("s3blk volume create");
        assert!(out.status.success(), "volume create: {}", String::from_utf8_lossy(&out.stderr));
        let id = format!("file://{}", vol.display());
        for node in published_to {
            std::fs::create_dir_all(vol.join("attachments")).expect("attachments dir");
            let a = serde_json::json!({ "node_id": node, "readonly": false, "created_unix": 0 });
            std::fs::write(vol.join(format!("attachments/{node}.json")), a.to_string()).expect("attachment");
        }
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).expect("state dir");
        let export = format!("{:08x}", crc32c::crc32c(id.as_bytes()));
        let socket = state.join(format!("{export}.sock"));
        let mut record = serde_json::json!({
            "volume_id": id,
            "staging_path": dir.path().join("staging").display().to_string(),
            "device": "/dev/nbd15",
            "socket": socket.display().to_string(),
            "export": export,
            "fs_type": null,
            "readonly": false,
            "cache_limit": 16 << 20,
        });
        if let Some(s) = legacy_secrets {
            record["secrets"] = serde_json::to_value(s).expect("secrets");
        }
        std::fs::write(Restarted::record_path_of(&state, &export), record.to_string()).expect("record");
        Self { dir, id, vol, socket, export }
    }

    fn record_path_of(state: &Path, export: &str) -> PathBuf {
        state.join(format!("{export}.json"))
    }

    fn record_path(&self) -> PathBuf {
        Restarted::record_path_of(&self.dir.path().join("state"), &self.export)
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("plugin.log")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn secrets_dir(&self) -> PathBuf {
        self.dir.path().join("run-s3blk")
    }

    /// The node plugin as it restarts on `node-1`; returns once its socket
    /// answers and it logged the outcome of recovering the volume.
    async fn start(&self) -> (Child, NodeClient<Channel>) {
        let sock = self.dir.path().join("csi.sock");
        let seen = self.log_text().len();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log()).expect("plugin log");
        let child = Command::new(common::s3blk_bin())
            .args(["--retry-attempts", "1", "--attempt-timeout", "2"])
            .args(["csi", "--mode=node", "--node-id=node-1"])
            .arg(format!("--state-dir={}", self.dir.path().join("state").display()))
            .arg(format!("--secrets-dir={}", self.secrets_dir().display()))
            .arg(format!("--endpoint=unix://{}", sock.display()))
            .env("S3BLK_LOG", "info")
            .stderr(log.try_clone().expect("dup log"))
            .stdout(log)
            .spawn()
            .expect("start plugin");
        for _ in 0..400 {
            if sock.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let node = NodeClient::new(common::grpc_channel(&sock).await);
        // Until recovery ends (a device it cannot connect is tried a few
        // times), calls for its volumes are ABORTED.
        for _ in 0..400 {
            if self.log_text()[seen..].contains("recovery of staged volumes finished") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (child, node)
    }

    async fn open(&self, read_only: bool) -> s3blk::volume::Volume {
        let loc = s3blk::location::Location::parse(&self.id, true).expect("volume id");
        let store =
            s3blk::csi::common::Stores::new(common::fast_policy()).get(&loc, &HashMap::new()).await.expect("store");
        let opts = s3blk::volume::OpenOptions { read_only, ..Default::default() };
        s3blk::volume::Volume::open(store, &loc.prefix, opts).await.expect("open volume")
    }

    fn marker_path(&self) -> PathBuf {
        self.dir.path().join("state").join(format!("{}.unflushed", self.export))
    }

    fn staging(&self) -> PathBuf {
        self.dir.path().join("staging")
    }

    fn unstage_req(&self) -> pb::NodeUnstageVolumeRequest {
        pb::NodeUnstageVolumeRequest {
            volume_id: self.id.clone(),
            staging_target_path: self.dir.path().join("staging").display().to_string(),
        }
    }
}

fn stop_child(mut child: Child) {
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    let _ = child.wait();
}

/// Issue 11 item 3: a plugin that restarts must not take back a volume
/// that has since been published to another node: opening it for write
/// would fence the legitimate writer there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_leaves_a_volume_published_to_another_node_alone() {
    let r = Restarted::new(&["node-2"], None);
    // The writer on node-2.
    let writer = r.open(false).await;
    writer.write(0, &common::pattern(1, 4096)).await.expect("write on node-2");
    writer.flush().await.expect("flush on node-2");
    let (child, _node) = r.start().await;
    let log = r.log_text();
    writer.write(4096, &common::pattern(2, 4096)).await.expect("write on node-2 after node-1 restarted");
    let flushed = writer.flush().await;
    stop_child(child);
    assert!(
        flushed.is_ok() && writer.fenced().is_none(),
        "the restarted node-1 plugin fenced node-2's writer: {flushed:?} {:?}\n{log}",
        writer.fenced()
    );
    assert!(log.contains("its attachment record no longer names this node"), "{log}");
    assert!(r.record_path().exists(), "the stage record is kept for NodeUnstage");
}

/// Issue 11 item 6: NodeUnstage commits acknowledged writes before it
/// lets the volume go; while the store refuses them the RPC fails (and
/// keeps failing on retry) and nothing is lost; once the store is back,
/// unstage succeeds and the writes are in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_unstage_fails_while_writes_cannot_be_committed() {
    let r = Restarted::new(&["node-1"], None);
    let (child, mut node) = r.start().await;
    assert!(r.log_text().contains("serving staged volume again"), "{}", r.log_text());
    // The store goes away before the writes, so nothing can be uploaded
    // behind the test's back; the writes are acknowledged from memory.
    let away = r.vol.with_extension("away");
    std::fs::rename(&r.vol, &away).expect("take the store away");
    // A file where the volume's directory was: nothing can be created under it.
    std::fs::write(&r.vol, b"not a directory").expect("block the volume's path");
    let data = common::pattern(7, 256 << 10);
    let mut nbd = common::nbd_client::Client::connect(&r.socket, &r.export).await;
    assert_eq!(nbd.write(1, 1 << 20, &data).await, 0, "write acknowledged");
    drop(nbd);
    for attempt in 0..2 {
        let e = node.node_unstage_volume(r.unstage_req()).await.expect_err("unstage must fail while the store is away");
        assert_eq!(e.code(), Code::Unavailable, "attempt {attempt}: {e:?}");
        assert!(e.message().contains("cannot commit"), "{}", e.message());
    }
    std::fs::remove_file(&r.vol).expect("unblock the volume's path");
    std::fs::rename(&away, &r.vol).expect("bring the store back");
    node.node_unstage_volume(r.unstage_req()).await.expect("unstage once the store is back");
    stop_child(child);
    assert!(!r.record_path().exists(), "the stage record outlived the unstage");
    let v = r.open(true).await;
    assert_eq!(v.read(1 << 20, data.len() as u64).await.expect("read back"), data, "acknowledged writes were lost");
}

/// An unstage naming another path than the volume's staging path (another
/// volume's, say) unmounts and detaches nothing: it unmounted that path and
/// cut the device while the volume's filesystem was still mounted at its
/// own. The volume stays served; the right unstage then goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_unstage_of_another_path_touches_nothing() {
    let r = Restarted::new(&["node-1"], None);
    let (child, mut node) = r.start().await;
    assert!(r.log_text().contains("serving staged volume again"), "{}", r.log_text());
    let mut wrong = r.unstage_req();
    wrong.staging_target_path = r.dir.path().join("another-volumes-staging").display().to_string();
    let e = node.node_unstage_volume(wrong).await.expect_err("an unstage of another path");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(r.record_path().exists(), "the stage record went");
    let mut nbd = common::nbd_client::Client::connect(&r.socket, &r.export).await;
    let data = common::pattern(5, 8192);
    assert_eq!(nbd.write(1, 0, &data).await, 0, "still served");
    drop(nbd);
    node.node_unstage_volume(r.unstage_req()).await.expect("the unstage of its own path");
    stop_child(child);
    assert!(!r.record_path().exists(), "the stage record outlived the unstage");
    assert_eq!(r.open(true).await.read(0, 8192).await.expect("read"), data);
}

/// NodeUnstage never cuts a device a filesystem is still mounted from (a
/// publish not undone, a mount stacked on the staging path): it fails
/// (FAILED_PRECONDITION) and keeps the volume staged. A loop device stands
/// in for the volume's device; needs root (skipped otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_unstage_leaves_a_device_that_is_still_mounted() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: a loop device and a mount need root");
        return;
    }
    let r = Restarted::new(&["node-1"], None);
    let image = r.dir.path().join("loop.img");
    std::fs::File::create(&image).and_then(|f| f.set_len(8 << 20)).expect("image");
    let out = Command::new("losetup").args(["-f", "--show"]).arg(&image).output().expect("losetup");
    assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
    let loop_dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mounted_at = r.dir.path().join("elsewhere");
    std::fs::create_dir_all(&mounted_at).expect("mkdir");
    let ok = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
    let ready = ok(Command::new("mkfs.ext4").args(["-q", "-F", &loop_dev]))
        && ok(Command::new("mount").arg(&loop_dev).arg(&mounted_at));
    // The record names the loop device as the volume's.
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r.record_path()).expect("record")).expect("record json");
    rec["device"] = serde_json::Value::String(loop_dev.clone());
    std::fs::write(r.record_path(), rec.to_string()).expect("record");
    let (child, mut node) = r.start().await;
    let refused = node.node_unstage_volume(r.unstage_req()).await;
    let _ = Command::new("umount").arg(&mounted_at).status();
    let _ = Command::new("losetup").args(["-d", &loop_dev]).status();
    stop_child(child);
    assert!(ready, "mkfs or mount of the loop device failed");
    let e = refused.expect_err("an unstage while the device is mounted");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("still mounted"), "{}", e.message());
    assert!(r.record_path().exists(), "the stage record went");
}

/// A staged volume taken over by another writer (fenced here) can still be
/// unstaged: its uncommitted writes can never be committed, so unstage
/// discards them (and their write-back log) instead of failing for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_unstage_lets_a_volume_taken_over_by_another_writer_go() {
    let r = Restarted::new(&["node-1"], None);
    let (child, mut node) = r.start().await;
    assert!(r.log_text().contains("serving staged volume again"), "{}", r.log_text());
    let mut nbd = common::nbd_client::Client::connect(&r.socket, &r.export).await;
    assert_eq!(nbd.write(1, 1 << 20, &common::pattern(8, 8192)).await, 0, "write acknowledged");
    // Another writer takes the volume over and commits something, while
    // the client is still connected (a disconnect flushes: a small write
    // commits in one PUT, before the other writer could open).
    let theirs = common::pattern(9, 4096);
    let other = r.open(false).await;
    other.write(0, &theirs).await.expect("write");
    other.flush().await.expect("flush");
    drop(other);
    drop(nbd);
    node.node_unstage_volume(r.unstage_req()).await.expect("unstage of a volume fenced by another writer");
    stop_child(child);
    let log = r.log_text();
    assert!(log.contains("taken over by another writer"), "{log}");
    assert!(!r.record_path().exists(), "the stage record outlived the unstage");
    let logs = r.dir.path().join("state").join("write-log");
    let left: Vec<_> = walk(&logs).into_iter().filter(|p| p.is_dir() && p.parent() != Some(logs.as_path())).collect();
    assert!(left.is_empty(), "the fenced writer's log was kept: {left:?}");
    let v = r.open(true).await;
    assert_eq!(v.read(0, 4096).await.expect("read"), theirs);
    assert_eq!(v.read(1 << 20, 8192).await.expect("read"), vec![0u8; 8192], "a fenced writer's write showed up");
}

/// Every path under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

/// Issue 11 item 7: stage secrets never stay on persistent disk. A stage
/// record of an earlier version holding them is rewritten without them;
/// they move to the secrets directory (0700, files 0600), leave it at
/// unstage, and appear in no log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_secrets_never_stay_in_the_state_dir_or_logs() {
    use std::os::unix::fs::PermissionsExt;
    let secrets: HashMap<String, String> = [
        ("accessKeyID".to_string(), "AKIDTESTSECRET0001".to_string()),
        ("secretAccessKey".to_string(), "sk-test-secret-value-0002".to_string()),
    ]
    .into();
    let r = Restarted::new(&["node-1"], Some(&secrets));
    let (child, mut node) = r.start().await;
    assert!(r.log_text().contains("serving staged volume again"), "{}", r.log_text());
    let on_disk = |p: &Path| {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        secrets.values().filter(|v| text.contains(v.as_str())).count()
    };
    for e in std::fs::read_dir(r.dir.path().join("state")).expect("state dir").flatten() {
        assert_eq!(on_disk(&e.path()), 0, "{} holds a secret", e.path().display());
    }
    let kept: Vec<PathBuf> =
        std::fs::read_dir(r.secrets_dir()).expect("secrets dir").flatten().map(|e| e.path()).collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(on_disk(&kept[0]), 2, "the secrets were not kept for the next restart");
    let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&r.secrets_dir()), 0o700);
    assert_eq!(mode(&kept[0]), 0o600);
    node.node_unstage_volume(r.unstage_req()).await.expect("unstage");
    assert!(!kept[0].exists(), "the secrets outlived the unstage");
    stop_child(child);
    let log = r.log_text();
    assert!(!log.is_empty());
    for v in secrets.values() {
        assert!(!log.contains(v.as_str()), "a secret is in the log:\n{log}");
    }
}

/// Issue 11 item 4, without a kernel: the served volume carries a marker
/// in the state directory while it holds acknowledged, uncommitted writes;
/// a flush clears it, a clean shutdown (SIGTERM) commits and clears it. A
/// plugin killed with the marker in place is served again with its
/// write-back log replayed; when that log is gone, it is not served again:
/// the next plugin reports the loss on every RPC until NodeUnstage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_killed_with_unflushed_writes_reports_the_loss_instead_of_serving() {
    let r = Restarted::new(&["node-1"], None);
    let (child, _node) = r.start().await;
    assert!(r.log_text().contains("serving staged volume again"), "{}", r.log_text());
    let mut nbd = common::nbd_client::Client::connect(&r.socket, &r.export).await;
    assert!(!r.marker_path().exists(), "marked before any write");
    assert_eq!(nbd.write(1, 0, &common::pattern(1, 8192)).await, 0);
    assert!(r.marker_path().exists(), "an acknowledged, uncommitted write left no marker");
    assert_eq!(nbd.flush(2).await, 0);
    assert!(!r.marker_path().exists(), "a flush that committed every write left the marker");

    // Killed with nothing unflushed: served again as after a clean exit.
    let mut child = child;
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    drop(nbd);
    let _ = std::fs::remove_file(r.dir.path().join("csi.sock"));
    let (child, _node) = r.start().await;
    let restarted = r.log_text();
    assert_eq!(restarted.matches("serving staged volume again").count(), 2, "{restarted}");
    let mut nbd = common::nbd_client::Client::connect(&r.socket, &r.export).await;

    // A clean shutdown commits what was acknowledged and clears the marker.
    let clean = common::pattern(2, 8192);
    assert_eq!(nbd.write(3, 1 << 20, &clean).await, 0);
    assert!(r.marker_path().exists());
    stop_child(child);
    drop(nbd);
    assert!(!r.marker_path().exists(), "SIGTERM left the marker: the next start would call committed writes lost");
    let v = r.open(true).await;
    assert_eq!(v.read(1 << 20, 8192).await.expect("read"), clean, "SIGTERM did not commit acknowledged writes");
    drop(v);

    // Killed with an acknowledged write not committed: its write-back log
    // has it, and the next process serves the volume with it.
    let (mut child, node) = r.start().await;
    assert!(r.log_text().contains("serving staged volume again"), "{}", r.log_text());
    let mut nbd = common::nbd_client::Client::connect(&r.socket, &r.export).await;
    let kept = common::pattern(3, 8192);
    assert_eq!(nbd.write(4, 2 << 20, &kept).await, 0);
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    drop((nbd, node));
    assert!(r.marker_path().exists());
    // The killed plugin left its CSI socket file: wait for the new one.
    let _ = std::fs::remove_file(r.dir.path().join("csi.sock"));
    let (mut child, node) = r.start().await;
    let log = r.log_text();
    assert!(log.contains("were replayed from its write-back log"), "{log}");
    assert!(!log.contains("exited without committing writes it had acknowledged"), "{log}");
    let mut nbd = common::nbd_client::Client::connect(&r.socket, &r.export).await;
    assert_eq!(nbd.read(5, 2 << 20, 8192).await.expect("read"), kept, "the acknowledged write was not replayed");

    // Killed again, and the write-back log is gone with the node's disk:
    // the acknowledged write is lost, and the next process says so.
    assert_eq!(nbd.write(6, 3 << 20, &common::pattern(4, 8192)).await, 0);
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    drop(nbd);
    assert!(r.marker_path().exists());
    std::fs::remove_dir_all(r.dir.path().join("state").join("write-log")).expect("remove the write-back log");
    let _ = std::fs::remove_file(r.dir.path().join("csi.sock"));

    let (child, mut node2) = r.start().await;
    drop(node);
    let log = r.log_text();
    assert!(log.contains("exited without committing writes it had acknowledged"), "{log}");
    // Kept until NodeUnstage: the next restart must report the loss again.
    assert!(r.marker_path().exists(), "the loss was forgotten: a later restart would serve the volume");
    let e = tokio::net::UnixStream::connect(&r.socket).await;
    assert!(e.is_err(), "the volume that lost writes is served again as if nothing happened");
    let lost =
        |s: &tonic::Status| s.code() == Code::FailedPrecondition && s.message().contains("lost unflushed writes");
    let stats = node2
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: r.id.clone(),
            volume_path: r.dir.path().display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .expect("stats of a volume that lost writes")
        .into_inner();
    let cond = stats.volume_condition.expect("a volume condition");
    assert!(
        cond.abnormal && cond.message.contains("lost unflushed writes in a plugin crash; restart the pod"),
        "{cond:?}"
    );
    let cap = block_cap();
    let e = node2.node_stage_volume(stage_req(&r.id, &r.staging(), &cap)).await.expect_err("stage must fail");
    assert!(lost(&e), "{e:?}");
    let target = r.dir.path().join("target");
    let e = node2
        .node_publish_volume(publish_req(&r.id, &r.staging(), &target, &cap))
        .await
        .expect_err("publish must fail");
    assert!(lost(&e), "{e:?}");
    let e = node2
        .node_expand_volume(pb::NodeExpandVolumeRequest {
            volume_id: r.id.clone(),
            volume_path: r.dir.path().display().to_string(),
            ..Default::default()
        })
        .await
        .expect_err("expand must fail");
    assert!(lost(&e), "{e:?}");
    node2.node_unstage_volume(r.unstage_req()).await.expect("unstage cleans up");
    assert!(!r.marker_path().exists() && !r.record_path().exists(), "unstage left state behind");
    stop_child(child);
}

/// Issue 11, spec: NodeGetVolumeStats and NodeExpandVolume answer
/// NOT_FOUND for a volume that is not staged here before they look at the
/// path, and for a path that does not exist; NodeExpandVolume honours the
/// capacity range's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stats_and_expand_check_the_volume_then_the_path_and_honour_the_limit() {
    let r = Restarted::new(&["node-1"], None);
    let (child, mut node) = r.start().await;
    assert!(r.log_text().contains("serving staged volume again"), "{}", r.log_text());
    let unknown = format!("file://{}", r.dir.path().join("store/pvc-unknown").display());
    let stats = |id: &str, path: &str| pb::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    };
    let expand = |id: &str, path: &str, range: Option<pb::CapacityRange>| pb::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        capacity_range: range,
        ..Default::default()
    };
    let missing = r.dir.path().join("no-such-path").display().to_string();
    let here = r.dir.path().display().to_string();
    for path in ["", "relative", missing.as_str()] {
        let e = node.node_get_volume_stats(stats(&unknown, path)).await.expect_err("unknown volume");
        assert_eq!(e.code(), Code::NotFound, "stats, unknown volume, path {path:?}: {e:?}");
        let e = node.node_expand_volume(expand(&unknown, path, None)).await.expect_err("unknown volume");
        assert_eq!(e.code(), Code::NotFound, "expand, unknown volume, path {path:?}: {e:?}");
    }
    let e = node.node_get_volume_stats(stats(&r.id, &missing)).await.expect_err("missing path");
    assert_eq!(e.code(), Code::NotFound, "stats, missing path: {e:?}");
    let grow = Some(pb::CapacityRange { required_bytes: 128 << 20, limit_bytes: 0 });
    let e = node.node_expand_volume(expand(&r.id, &missing, grow)).await.expect_err("missing path");
    assert_eq!(e.code(), Code::NotFound, "expand, missing path: {e:?}");
    let over = Some(pb::CapacityRange { required_bytes: 128 << 20, limit_bytes: 100 << 20 });
    let e = node.node_expand_volume(expand(&r.id, &here, over)).await.expect_err("over the limit");
    assert_eq!(e.code(), Code::OutOfRange, "expand beyond limit_bytes: {e:?}");
    stop_child(child);
    assert_eq!(r.open(true).await.size(), 64 << 20, "an expand beyond its limit grew the volume");
}

/// What the writer of the crash test saw.
#[derive(Default)]
struct WriterLog {
    /// Files whose fsync returned success, with their content.
    synced: Vec<(PathBuf, Vec<u8>)>,
    /// The first I/O error the filesystem reported, if any.
    error: Option<String>,
}

/// Write and fsync numbered files until `stop`, or the first error;
/// parks between files while `hold` is set (and says so in `parked`).
fn fsync_writer(
    dir: PathBuf,
    log: std::sync::Arc<std::sync::Mutex<WriterLog>>,
    hold: std::sync::Arc<std::sync::atomic::AtomicBool>,
    parked: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering::SeqCst;
    for i in 0u64.. {
        while hold.load(SeqCst) {
            parked.store(true, SeqCst);
            std::thread::sleep(Duration::from_millis(5));
        }
        parked.store(false, SeqCst);
        if stop.load(SeqCst) {
            return;
        }
        let path = dir.join(format!("synced-{i}.bin"));
        let data = common::pattern(1000 + i, 64 << 10);
        let r = std::fs::File::create(&path).and_then(|mut f| {
            f.write_all(&data)?;
            f.sync_all()
        });
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(()) => log.synced.push((path, data)),
            Err(e) => {
                log.error = Some(format!("{}: {e}", path.display()));
                return;
            }
        }
    }
}

fn fsck_block_device(dev: &str) -> (bool, String) {
    let out = Command::new("fsck.ext4").args(["-f", "-n", dev]).output().expect("run fsck.ext4");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Issue 11 item 4 and issue 13 with a real kernel: a writer doing
/// write+fsync in a loop, and a buffered write the device acknowledged but
/// nobody flushed; the plugin is killed (SIGKILL) and started again. The
/// restarted plugin replays the killed one's write-back log and reconnects
/// the device: the filesystem sees no I/O error, the writer goes on, the
/// pending file's data is there, every file whose fsync returned is intact
/// after an unstage and a stage again, and fsck finds the filesystem clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs inside the VM started by node_stage_publish_expand_restart_block_in_a_vm"]
async fn plugin_crash_never_loses_fsynced_writes_silently_inside_vm() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::sync::{Arc, Mutex};
    assert_eq!(std::env::var("S3BLK_IN_VM").as_deref(), Ok("1"), "only inside the VM");
    let w = work();
    let plugin = start_plugin("node-1");
    let (mut ctl, mut node) = clients(&plugin.sock).await;
    let ext4 = mount_cap("ext4");
    let id = create(&mut ctl, "pvc-crash", 256 << 20, ext4.clone()).await;
    let staging = w.join("staging/crash");
    let target = w.join("pods/crash/ext4");
    publish_ctl(&mut ctl, &id, "node-1", &ext4).await;
    node.node_stage_volume(stage_req(&id, &staging, &ext4)).await.expect("stage");
    node.node_publish_volume(publish_req(&id, &staging, &target, &ext4)).await.expect("publish");

    step("crash: a writer fsyncs numbered files");
    let log = Arc::new(Mutex::new(WriterLog::default()));
    let (hold, parked, stop) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let writer = {
        let (dir, log, hold, parked, stop) = (target.clone(), log.clone(), hold.clone(), parked.clone(), stop.clone());
        std::thread::spawn(move || fsync_writer(dir, log, hold, parked, stop))
    };
    let synced = |log: &Arc<Mutex<WriterLog>>| log.lock().unwrap_or_else(|p| p.into_inner()).synced.len();
    for _ in 0..600 {
        if synced(&log) >= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(synced(&log) >= 10, "the writer made no progress");

    step("crash: a buffered write reaches the device unflushed; SIGKILL the plugin");
    hold.store(true, SeqCst);
    while !parked.load(SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pending = target.join("pending.bin");
    let pending_data = common::pattern(7, 1 << 20);
    let pending_file = {
        use std::os::fd::AsRawFd;
        let mut f = std::fs::File::create(&pending).expect("create pending");
        f.write_all(&pending_data).expect("write pending");
        // Write the pages to the device and wait for its answer, without a
        // flush: the plugin acknowledged them from memory.
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: sync_file_range on a descriptor this function owns.
        let rc = unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, flags) };
        assert_eq!(rc, 0, "sync_file_range: {}", std::io::Error::last_os_error());
        f
    };
    let mut child = plugin.child;
    child.kill().expect("SIGKILL the plugin");
    let _ = child.wait();
    hold.store(false, SeqCst);
    drop((ctl, node));
    std::thread::sleep(Duration::from_secs(1));
    let _ = std::fs::remove_file(&plugin.sock);

    step("crash: restart the plugin; the writer goes on");
    let plugin = start_plugin("node-1");
    let (mut ctl, mut node) = clients(&plugin.sock).await;
    // The kernel's I/O resumes (or fails) once the new plugin recovered the
    // volume; the pending file's fsync says which.
    let pending_sync = pending_file.sync_all();
    drop(pending_file);
    let after = synced(&log);
    for _ in 0..300 {
        let done = {
            let l = log.lock().unwrap_or_else(|p| p.into_inner());
            l.error.is_some() || l.synced.len() >= after + 10
        };
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, SeqCst);
    writer.join().expect("writer thread");
    let (mut files, writer_error) = {
        let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
        (std::mem::take(&mut l.synced), l.error.take())
    };
    match &pending_sync {
        Ok(()) => files.push((pending.clone(), pending_data)),
        Err(e) => step(&format!("crash: fsync of the pending file failed: {e}")),
    }
    let saw_errors = writer_error.is_some() || pending_sync.is_err();
    step(&format!(
        "crash: {} files fsync'd; the filesystem saw I/O errors: {} ({writer_error:?})",
        files.len(),
        saw_errors
    ));
    // The write-back log: the restarted plugin replays what the killed one
    // acknowledged, reconnects the device, and the filesystem goes on as if
    // nothing had happened.
    let stats = volume_stats(&mut node, &id, &target).await;
    assert!(
        !saw_errors,
        "the filesystem saw I/O errors after a plugin crash ({writer_error:?}, pending fsync {pending_sync:?}); \
         condition {:?}",
        stats.volume_condition
    );
    assert!(stats.volume_condition.as_ref().is_none_or(|c| !c.abnormal), "{:?}", stats.volume_condition);

    step("crash: unstage, stage again: every fsync'd file is intact");
    unstage(&mut node, &id, &staging, &target).await;
    node.node_stage_volume(stage_req(&id, &staging, &ext4)).await.expect("stage after the crash");
    node.node_publish_volume(publish_req(&id, &staging, &target, &ext4)).await.expect("publish after the crash");
    let mut damaged = Vec::new();
    for (p, data) in &files {
        if std::fs::read(p).ok().as_ref() != Some(data) {
            damaged.push(p.display().to_string());
        }
    }
    assert!(
        damaged.is_empty(),
        "silent loss: the filesystem saw no I/O error ({saw_errors}) yet files whose fsync returned are damaged or \
         missing after the plugin crash: {damaged:?}"
    );
    unstage(&mut node, &id, &staging, &target).await;

    step("crash: fsck finds the filesystem clean");
    let block = block_cap();
    let bstaging = w.join("staging/crash-block");
    let btarget = w.join("pods/crash/dev");
    node.node_stage_volume(stage_req(&id, &bstaging, &block)).await.expect("stage as a block device");
    node.node_publish_volume(publish_req(&id, &bstaging, &btarget, &block)).await.expect("publish block");
    let (clean, out) = fsck_block_device(&btarget.display().to_string());
    assert!(clean, "fsck after the crash:\n{out}");
    unstage(&mut node, &id, &bstaging, &btarget).await;
    unpublish_ctl(&mut ctl, &id, "node-1").await;
    drop((ctl, node));
    plugin.stop();
    wait_all_detached("after the crash test");
    step("crash: done");
}

async fn create_from(
    ctl: &mut ControllerClient<Channel>,
    name: &str,
    size: i64,
    cap: pb::VolumeCapability,
    source: pb::volume_content_source::Type,
) -> String {
    let r = ctl
        .create_volume(pb::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(pb::CapacityRange { required_bytes: size, limit_bytes: 0 }),
            volume_capabilities: vec![cap],
            volume_content_source: Some(pb::VolumeContentSource { r#type: Some(source) }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e:?}"));
    r.into_inner().volume.expect("volume").volume_id
}

fn reader_cap(fs: &str) -> pb::VolumeCapability {
    let mut cap = mount_cap(fs);
    cap.access_mode = Some(pb::volume_capability::AccessMode {
        mode: pb::volume_capability::access_mode::Mode::MultiNodeReaderOnly as i32,
    });
    cap
}

fn filesystem_bytes(path: &Path) -> u64 {
    s3blk::csi::mount::statvfs(path).expect("statvfs").0[0]
}

/// Issue 11, mounts: an xfs clone mounts beside its source (`nouuid`); a
/// snapshot of a mounted ext4 filesystem restored read-only mounts without
/// journal recovery (`noload`); a volume restored into a larger size shows
/// the larger filesystem once staged; NodeExpandVolume works without a
/// capacity range; ext4 gets a preen fsck before it is mounted (a
/// filesystem flagged as having errors comes back clean).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs inside the VM started by node_stage_publish_expand_restart_block_in_a_vm"]
async fn stage_mounts_clones_restores_and_checks_filesystems_inside_vm() {
    use pb::volume_content_source::{SnapshotSource, Type, VolumeSource};
    assert_eq!(std::env::var("S3BLK_IN_VM").as_deref(), Ok("1"), "only inside the VM");
    let w = work();
    let plugin = start_plugin("node-1");
    let (mut ctl, mut node) = clients(&plugin.sock).await;
    let mut failures = Vec::new();

    step("mounts: an xfs clone staged beside its source");
    let xfs = mount_cap("xfs");
    let src = create(&mut ctl, "pvc-xfs-src", 320 << 20, xfs.clone()).await;
    let (s_staging, s_target) = (w.join("staging/xsrc"), w.join("pods/m/xsrc"));
    publish_ctl(&mut ctl, &src, "node-1", &xfs).await;
    node.node_stage_volume(stage_req(&src, &s_staging, &xfs)).await.expect("stage xfs source");
    node.node_publish_volume(publish_req(&src, &s_staging, &s_target, &xfs)).await.expect("publish xfs source");
    let xfiles = write_files(&s_target, "xsrc", 5);
    let clone = create_from(
        &mut ctl,
        "pvc-xfs-clone",
        320 << 20,
        xfs.clone(),
        Type::Volume(VolumeSource { volume_id: src.clone() }),
    )
    .await;
    let (c_staging, c_target) = (w.join("staging/xclone"), w.join("pods/m/xclone"));
    publish_ctl(&mut ctl, &clone, "node-1", &xfs).await;
    match node.node_stage_volume(stage_req(&clone, &c_staging, &xfs)).await {
        Ok(_) => {
            node.node_publish_volume(publish_req(&clone, &c_staging, &c_target, &xfs)).await.expect("publish clone");
            check_files(&xfiles, &s_target, &c_target);
            unstage(&mut node, &clone, &c_staging, &c_target).await;
        }
        Err(e) => failures.push(format!("an xfs clone does not mount beside its source: {e:?}")),
    }
    unpublish_ctl(&mut ctl, &clone, "node-1").await;

    step("mounts: a snapshot of a mounted ext4 filesystem, restored read-only and into a larger size");
    let ext4 = mount_cap("ext4");
    let eid = create(&mut ctl, "pvc-ext4-src", 128 << 20, ext4.clone()).await;
    let (e_staging, e_target) = (w.join("staging/esrc"), w.join("pods/m/esrc"));
    publish_ctl(&mut ctl, &eid, "node-1", &ext4).await;
    node.node_stage_volume(stage_req(&eid, &e_staging, &ext4)).await.expect("stage ext4 source");
    node.node_publish_volume(publish_req(&eid, &e_staging, &e_target, &ext4)).await.expect("publish ext4 source");
    let efiles = write_files(&e_target, "esrc", 5);
    // Unmounting checkpoints the journal: these files are in place, where a
    // mount that skips journal recovery sees them. Mounted again, the
    // filesystem needs recovery until it is unmounted, so the snapshot is
    // crash-consistent; the later files may be in its journal only.
    unstage(&mut node, &eid, &e_staging, &e_target).await;
    node.node_stage_volume(stage_req(&eid, &e_staging, &ext4)).await.expect("stage ext4 source again");
    node.node_publish_volume(publish_req(&eid, &e_staging, &e_target, &ext4)).await.expect("publish again");
    let later = write_files(&e_target, "esrc-later", 3);
    let source_bytes = filesystem_bytes(&e_target);
    let snap = ctl
        .create_snapshot(pb::CreateSnapshotRequest {
            source_volume_id: eid.clone(),
            name: "snap-esrc".into(),
            ..Default::default()
        })
        .await
        .expect("snapshot of the mounted volume")
        .into_inner()
        .snapshot
        .expect("snapshot");
    let from_snap = || Type::Snapshot(SnapshotSource { snapshot_id: snap.snapshot_id.clone() });
    let ro = reader_cap("ext4");
    let rid = create_from(&mut ctl, "pvc-ext4-ro", 128 << 20, ro.clone(), from_snap()).await;
    let (r_staging, r_target) = (w.join("staging/ero"), w.join("pods/m/ero"));
    ctl.controller_publish_volume(pb::ControllerPublishVolumeRequest {
        volume_id: rid.clone(),
        node_id: "node-1".into(),
        volume_capability: Some(ro.clone()),
        readonly: true,
        ..Default::default()
    })
    .await
    .expect("controller publish read-only");
    match node.node_stage_volume(stage_req(&rid, &r_staging, &ro)).await {
        Ok(_) => {
            node.node_publish_volume(publish_req(&rid, &r_staging, &r_target, &ro)).await.expect("publish ro");
            check_files(&efiles, &e_target, &r_target);
            unstage(&mut node, &rid, &r_staging, &r_target).await;
        }
        Err(e) => failures.push(format!("a crash-consistent snapshot does not mount read-only: {e:?}")),
    }
    unpublish_ctl(&mut ctl, &rid, "node-1").await;

    let big = create_from(&mut ctl, "pvc-ext4-big", 512 << 20, ext4.clone(), from_snap()).await;
    let (b_staging, b_target) = (w.join("staging/ebig"), w.join("pods/m/ebig"));
    publish_ctl(&mut ctl, &big, "node-1", &ext4).await;
    node.node_stage_volume(stage_req(&big, &b_staging, &ext4)).await.expect("stage the larger restore");
    node.node_publish_volume(publish_req(&big, &b_staging, &b_target, &ext4)).await.expect("publish larger restore");
    check_files(&efiles, &e_target, &b_target);
    check_files(&later, &e_target, &b_target);
    let big_bytes = filesystem_bytes(&b_target);
    if big_bytes < source_bytes + (300 << 20) {
        failures.push(format!(
            "a 128 MiB filesystem restored into 512 MiB was not grown at stage: {source_bytes} -> {big_bytes} bytes"
        ));
    }
    step("mounts: NodeExpandVolume without a capacity range");
    let r = node
        .node_expand_volume(pb::NodeExpandVolumeRequest {
            volume_id: big.clone(),
            volume_path: b_target.display().to_string(),
            staging_target_path: b_staging.display().to_string(),
            volume_capability: Some(ext4.clone()),
            ..Default::default()
        })
        .await;
    match r {
        Ok(r) => assert_eq!(r.into_inner().capacity_bytes, 512 << 20),
        Err(e) => failures.push(format!("NodeExpandVolume without a capacity range: {e:?}")),
    }
    unstage(&mut node, &big, &b_staging, &b_target).await;

    step("mounts: an ext4 filesystem flagged with errors is checked before it is mounted");
    let block = block_cap();
    let (k_staging, k_target) = (w.join("staging/eblk"), w.join("pods/m/eblk"));
    node.node_stage_volume(stage_req(&big, &k_staging, &block)).await.expect("stage as a block device");
    node.node_publish_volume(publish_req(&big, &k_staging, &k_target, &block)).await.expect("publish block");
    let st = Command::new("tune2fs").args(["-E", "force_fsck"]).arg(&k_target).status().expect("tune2fs");
    assert!(st.success(), "tune2fs -E force_fsck");
    unstage(&mut node, &big, &k_staging, &k_target).await;
    node.node_stage_volume(stage_req(&big, &b_staging, &ext4)).await.expect("stage the flagged filesystem");
    node.node_publish_volume(publish_req(&big, &b_staging, &b_target, &ext4)).await.expect("publish");
    check_files(&efiles, &e_target, &b_target);
    unstage(&mut node, &big, &b_staging, &b_target).await;
    node.node_stage_volume(stage_req(&big, &k_staging, &block)).await.expect("stage as a block device");
    node.node_publish_volume(publish_req(&big, &k_staging, &k_target, &block)).await.expect("publish block");
    let out = Command::new("dumpe2fs").arg("-h").arg(&k_target).output().expect("dumpe2fs");
    let text = String::from_utf8_lossy(&out.stdout);
    let state = text.lines().find(|l| l.starts_with("Filesystem state:")).unwrap_or("no state line").to_string();
    if !state.ends_with(" clean") {
        failures.push(format!("no preen fsck before the mount: the filesystem still says {state:?}"));
    }
    unstage(&mut node, &big, &k_staging, &k_target).await;
    unpublish_ctl(&mut ctl, &big, "node-1").await;

    unstage(&mut node, &eid, &e_staging, &e_target).await;
    unpublish_ctl(&mut ctl, &eid, "node-1").await;
    unstage(&mut node, &src, &s_staging, &s_target).await;
    unpublish_ctl(&mut ctl, &src, "node-1").await;
    drop((ctl, node));
    plugin.stop();
    assert!(failures.is_empty(), "stage mounts:\n{}", failures.join("\n"));
    wait_all_detached("after the mount tests");
    step("mounts: done");
}

/// Nbd devices attached now (with a size).
fn attached_devices() -> Vec<String> {
    nbd_sizes().into_iter().filter(|(_, s)| *s > 0).map(|(d, _)| d).collect()
}

/// The first device attached that is not in `before`, waiting up to 30 s.
async fn device_attached_since(before: &[String]) -> Option<String> {
    for _ in 0..3000 {
        if let Some(d) = attached_devices().into_iter().find(|d| !before.contains(d)) {
            return Some(d);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// The processes running mkfs on `device` now (from /proc/*/cmdline).
fn mkfs_pids(device: &str) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .flatten()
        .filter(|p| {
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            // The program, or the script a shell runs.
            args.iter().take(2).any(|a| a.windows(4).any(|w| w == b"mkfs" || w == b"mke2"))
                && args.contains(&device.as_bytes())
        })
        .filter_map(|p| p.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect()
}

fn mkfs_running(device: &str) -> bool {
    !mkfs_pids(device).is_empty()
}

/// SIGKILL every mkfs of `device`.
fn kill_mkfs(device: &str) {
    for pid in mkfs_pids(device) {
        // SAFETY: kill has no memory preconditions; a pid gone meanwhile
        // only makes it fail.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// How many mounts sit at `path` (from /proc/self/mountinfo).
fn mounts_at(path: &Path) -> usize {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let target = path.display().to_string();
    info.lines().filter(|l| l.split(' ').nth(4) == Some(target.as_str())).count()
}

/// Runs only inside the VM: a NodeStage whose caller gives up after the
/// device is attached (kubelet's deadline, here the client dropping the
/// call) still finishes; its retry answers ABORTED until then and OK after,
/// and the volume ends up on one device, mounted once. A stage dropped
/// between its steps left its device attached and its volume served, and
/// the retry attached and mounted the volume a second time. The same when
/// the plugin is stopped (SIGTERM) while such a stage runs: it waits for
/// the stage, and the restarted plugin serves the volume on that device;
/// and when it and its mkfs are killed (SIGKILL) while the stage makes the
/// filesystem: the device was recorded as soon as it was attached, so the
/// restarted plugin serves the volume on it, and the retried stage makes
/// the filesystem again over what the cut mkfs left (its mark on the
/// volume says so) and finishes there (recorded only at the end, the device
/// stayed attached unknown, and the retry attached the volume a second
/// time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs inside the VM started by node_stage_publish_expand_restart_block_in_a_vm"]
async fn a_node_stage_its_caller_gives_up_on_finishes_once_inside_vm() {
    assert_eq!(std::env::var("S3BLK_IN_VM").as_deref(), Ok("1"), "only inside the VM");
    let w = work().join("given-up");
    std::fs::create_dir_all(&w).expect("work dir");
    let log = w.join("plugin.log");
    let _dump = LogOnPanic(log.clone());
    let args: Vec<String> = vec![
        "csi".into(),
        "--mode=all".into(),
        "--node-id=node-g".into(),
        format!("--store=file://{}", w.join("store").display()),
        format!("--state-dir={}", w.join("state").display()),
    ];
    let plugin = spawn_plugin(&args, &w.join("csi.sock"), false, Some(&log));
    let (mut ctl, mut node) = clients(&plugin.sock).await;
    let ext4 = mount_cap("ext4");
    let id = create(&mut ctl, "pvc-given-up", 2 << 30, ext4.clone()).await;
    publish_ctl(&mut ctl, &id, "node-g", &ext4).await;
    let before = attached_devices();
    let staging = w.join("staging");
    let mut req = stage_req(&id, &staging, &ext4);
    // A mkfs that writes its inode tables and journal: seconds, not a blink.
    req.volume_context.insert("mkfsOptions".into(), "-E lazy_itable_init=0,lazy_journal_init=0,nodiscard".into());

    step("a stage given up on once its device is attached");
    let mut n2 = node.clone();
    let first = req.clone();
    let call = tokio::spawn(async move { n2.node_stage_volume(first).await });
    let seen = device_attached_since(&before).await;
    call.abort();
    let given_up = call.await;
    let seen = seen.expect("the stage attached no device within 30 s");
    assert!(given_up.is_err(), "the stage answered before it was given up on ({given_up:?}); the test proves nothing");

    step("its retry: ABORTED while the first runs, then OK");
    let mut aborted = 0;
    for i in 0.. {
        match node.node_stage_volume(req.clone()).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::Aborted && i < 600 => {
                aborted += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("stage retry: {s}"),
        }
    }
    println!("the retry was answered ABORTED {aborted} times");
    let now: Vec<String> = attached_devices().into_iter().filter(|d| !before.contains(d)).collect();
    assert_eq!(now, vec![seen.clone()], "the volume must be on the one device its first stage attached");
    assert_eq!(mounts_at(&staging), 1, "the staging path must hold one mount");
    assert_eq!(mounted_device(&staging), seen);

    step("unstage lets it go");
    let unstage =
        pb::NodeUnstageVolumeRequest { volume_id: id.clone(), staging_target_path: staging.display().to_string() };
    node.node_unstage_volume(unstage).await.expect("unstage");
    assert_eq!(mounts_at(&staging), 0, "unstage left a mount");
    let mut left = attached_devices();
    for _ in 0..200 {
        left = attached_devices().into_iter().filter(|d| !before.contains(d)).collect();
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(left.is_empty(), "devices still attached after unstage: {left:?}");

    step("a stage given up on, and the plugin stopped while it runs");
    let mut n2 = node.clone();
    let first = req.clone();
    let call = tokio::spawn(async move { n2.node_stage_volume(first).await });
    let seen = device_attached_since(&before).await;
    call.abort();
    let _ = call.await;
    let seen = seen.expect("the stage attached no device within 30 s");
    drop((ctl, node));
    plugin.stop();
    let plugin = spawn_plugin(&args, &w.join("csi.sock"), false, Some(&log));
    let (ctl, mut node) = clients(&plugin.sock).await;
    for i in 0.. {
        match node.node_stage_volume(req.clone()).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::Aborted && i < 600 => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(s) => panic!("stage after the restart: {s}"),
        }
    }
    let now: Vec<String> = attached_devices().into_iter().filter(|d| !before.contains(d)).collect();
    assert_eq!(now, vec![seen.clone()], "the volume must be on the one device its first stage attached");
    assert_eq!(mounts_at(&staging), 1, "the staging path must hold one mount");
    let unstage =
        pb::NodeUnstageVolumeRequest { volume_id: id.clone(), staging_target_path: staging.display().to_string() };
    node.node_unstage_volume(unstage).await.expect("unstage");

    step("a stage whose plugin is killed (SIGKILL) while it makes the filesystem");
    // The plugin's mkfs.ext4, once: it writes a block that is not zeros
    // (as every mkfs soon does), then waits to be killed; after that, the
    // real one. Only the stage's mark on the volume then lets a retry
    // make the filesystem over what the cut mkfs left.
    let bin = w.join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let once = w.join("slow-mkfs-once");
    let written = w.join("slow-mkfs-wrote");
    std::fs::write(&once, b"").expect("flag");
    let wrapper = format!(
        "#!/bin/sh\nfor dev; do :; done\nif rm {once} 2>/dev/null; then\n  printf 's3blk-partial-mkfs' | dd of=\"$dev\" bs=4096 seek=1 conv=notrunc,fsync 2>/dev/null\n  touch {written}\n  sleep 600\nfi\nexec /usr/sbin/mkfs.ext4 \"$@\"\n",
        once = once.display(),
        written = written.display()
    );
    std::fs::write(bin.join("mkfs.ext4"), wrapper).expect("wrapper");
    std::process::Command::new("chmod").arg("+x").arg(bin.join("mkfs.ext4")).status().expect("chmod");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    drop((ctl, node));
    plugin.stop();
    let plugin = spawn_plugin_with(&args, &w.join("csi.sock"), false, Some(&log), &[("PATH", path.clone())]);
    let (mut ctl, node) = clients(&plugin.sock).await;
    // A fresh volume, so the stage runs mkfs again.
    let id2 = create(&mut ctl, "pvc-killed-stage", 2 << 30, ext4.clone()).await;
    publish_ctl(&mut ctl, &id2, "node-g", &ext4).await;
    let before = attached_devices();
    let staging2 = w.join("staging-killed");
    let mut req2 = req.clone();
    req2.volume_id = id2.clone();
    req2.staging_target_path = staging2.display().to_string();
    let mut n2 = node.clone();
    let first = req2.clone();
    let call = tokio::spawn(async move { n2.node_stage_volume(first).await });
    let seen = device_attached_since(&before).await;
    let seen = seen.expect("the stage attached no device within 30 s");
    // Killed once mkfs wrote (its device attached and, with the fix,
    // recorded): not in the moment between the attach and the record.
    let mut making = false;
    for _ in 0..3000 {
        if mkfs_running(&seen) && written.exists() {
            making = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(making, "no mkfs of {seen} wrote within 30 s");
    let mut plugin = plugin;
    plugin.child.kill().expect("SIGKILL the plugin");
    let _ = plugin.child.wait();
    // Its mkfs goes too (an OOM kill of the pod's processes): what it
    // wrote is no filesystem, and only the stage's mark on the volume lets
    // the retry make it again.
    kill_mkfs(&seen);
    let killed = call.await;
    assert!(
        !matches!(killed, Ok(Ok(_))),
        "the stage answered before the plugin was killed ({killed:?}); the test proves nothing"
    );
    drop((ctl, node));
    // A killed plugin leaves its socket file: wait for the new one's.
    let _ = std::fs::remove_file(w.join("csi.sock"));
    let plugin = spawn_plugin(&args, &w.join("csi.sock"), false, Some(&log));
    let (mut ctl, mut node) = clients(&plugin.sock).await;
    // Its retry (kubelet's): refused while recovery runs, or while the
    // killed stage's mkfs, which outlived the plugin, holds the device.
    let mut refusals = Vec::new();
    for i in 0.. {
        match node.node_stage_volume(req2.clone()).await {
            Ok(_) => break,
            Err(s) if i < 600 => {
                refusals.push(format!("{:?}: {}", s.code(), s.message()));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("stage after the kill: {s}; refused before: {refusals:?}"),
        }
    }
    println!("the retry was refused {} times: {:?}", refusals.len(), refusals.last());
    let now: Vec<String> = attached_devices().into_iter().filter(|d| !before.contains(d)).collect();
    assert_eq!(now, vec![seen.clone()], "the volume must be on the one device the killed stage attached");
    assert_eq!(mounts_at(&staging2), 1, "the staging path must hold one mount");
    assert_eq!(mounted_device(&staging2), seen);
    let marks: Vec<PathBuf> = walk(&w.join("store")).into_iter().filter(|p| p.ends_with("formatting.json")).collect();
    assert!(marks.is_empty(), "the mark of the killed stage's mkfs outlived the filesystem: {marks:?}");
    let unstage =
        pb::NodeUnstageVolumeRequest { volume_id: id2.clone(), staging_target_path: staging2.display().to_string() };
    node.node_unstage_volume(unstage).await.expect("unstage after the kill");
    unpublish_ctl(&mut ctl, &id2, "node-g").await;
    unpublish_ctl(&mut ctl, &id, "node-g").await;
    plugin.stop();
}
