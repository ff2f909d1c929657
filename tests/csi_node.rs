//! The CSI node service with a real kernel: inside a QEMU VM (see
//! tests/vm/run.sh), `s3blk csi --mode all` stages volumes through
//! nbd-client, makes ext4 and xfs filesystems, publishes them, expands them
//! online, keeps I/O going across a plugin restart, moves them to another
//! node id, and hands out raw block devices.
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
        .arg("540")
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
    let sock = w.join("csi.sock");
    let child = Command::new(std::env::var("S3BLK_BIN").expect("S3BLK_BIN"))
        .args(["csi", "--mode", "all", "--node-id", node_id, "--endpoint"])
        .arg(format!("unix://{}", sock.display()))
        .arg("--store")
        .arg(format!("file://{}", w.join("store").display()))
        .arg("--state-dir")
        .arg(w.join("state"))
        .env("S3BLK_LOG", "info")
        .spawn()
        .expect("start plugin");
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Plugin { child, sock }
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
        s3blk::csi::mount::nbd_devices().iter().all(|d| s3blk::csi::mount::device_size(d) == 0),
        "a device stayed attached"
    );

    step("ext4: stage (mkfs), publish, write files");
    publish_ctl(&mut ctl, &id, "node-1", &ext4).await;
    node.node_stage_volume(stage_req(&id, &staging, &ext4)).await.expect("stage");
    node.node_stage_volume(stage_req(&id, &staging, &ext4)).await.expect("stage is idempotent");
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
    drop((ctl, node));
    plugin.stop();
    assert!(s3blk::csi::mount::nbd_devices().iter().all(|d| s3blk::csi::mount::device_size(d) == 0));
    step("done");
}
