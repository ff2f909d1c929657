//! The CSI controller over gRPC on a unix socket, against a real S3 server
//! (moto): spec behaviour, idempotency, error codes, pagination, capacity
//! rounding, attachments, snapshots and clones restoring the right bytes.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use s3blk::csi::common::Stores;
use s3blk::csi::pb;
use s3blk::csi::pb::controller_client::ControllerClient;
use s3blk::csi::pb::identity_client::IdentityClient;
use s3blk::csi::server::{CsiConfig, Mode};
use s3blk::location::Location;
use s3blk::store::{DynStore, PutMode};
use s3blk::volume::{OpenOptions, Volume, format};
use tonic::Code;
use tonic::transport::Channel;

struct Driver {
    ctl: ControllerClient<Channel>,
    id: IdentityClient<Channel>,
    bucket: String,
    store: DynStore,
    sock: std::path::PathBuf,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), s3blk::csi::server::CsiError>>,
    cfg: CsiConfig,
    stores: Arc<Stores>,
}

/// ControllerPublish of `volume_id` to `node`, read-write unless `readonly`.
fn publish_req(volume_id: &str, node: &str, readonly: bool) -> pb::ControllerPublishVolumeRequest {
    pb::ControllerPublishVolumeRequest {
        volume_id: volume_id.into(),
        node_id: node.into(),
        volume_capability: Some(rwo()),
        readonly,
        secrets: secrets(),
        volume_context: HashMap::new(),
    }
}

async fn driver() -> Option<Driver> {
    driver_with(std::time::Duration::ZERO, std::time::Duration::from_secs(300)).await
}

async fn driver_with(compact_interval: std::time::Duration, compact_safety_age: std::time::Duration) -> Option<Driver> {
    let endpoint = common::s3_endpoint()?;
    let stores = Arc::new(Stores::with_defaults(common::fast_policy(), common::s3_settings(&endpoint)));
    driver_opts(compact_interval, compact_safety_age, None, stores).await
}

/// A driver in `--mode all` as node `node` when given; `stores` is what
/// requests without secrets (ListVolumes, GetVolume) connect with.
async fn driver_opts(
    compact_interval: std::time::Duration,
    compact_safety_age: std::time::Duration,
    node: Option<&str>,
    stores: Arc<Stores>,
) -> Option<Driver> {
    let bucket = common::unique("csi");
    let raw = common::s3_raw_store(&bucket).await?;
    let store: DynStore = Arc::new(s3blk::store::retry::RetryStore::new(raw, common::fast_policy()));
    // The nodes the tests publish to, registered as their plugins would.
    for n in ["node-a", "node-b"] {
        let rec = format!(r#"{{"node_id":"{n}","hostname":"test","started_unix":0,"version":"test"}}"#);
        store.put(&format!("k8s/.s3blk-nodes/{n}.json"), rec.into(), PutMode::Overwrite).await.expect("node record");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("csi.sock");
    let cfg = CsiConfig {
        mode: if node.is_some() { Mode::All } else { Mode::Controller },
        endpoint: format!("unix://{}", sock.display()),
        driver_name: "csi.s3blk.dev".into(),
        node_id: node.map(str::to_string),
        default_store: Some(Location::parse(&format!("s3://{bucket}/k8s"), false).expect("store")),
        capacity: 1 << 50,
        capacity_tracking: false,
        state_dir: dir.path().join("state"),
        secrets_dir: dir.path().join("secrets"),
        max_volumes: 16,
        dirty_limit: 64 << 20,
        cache_limit: 64 << 20,
        memory_budget: None,
        memory_limit: None,
        busy_poll: std::time::Duration::from_micros(50),
        write_log_limit: 1 << 30,
        patch_limit: s3blk::volume::engine::DEFAULT_PATCH_LIMIT,
        compact_interval,
        compact_safety_age,
        // Some tests compact at once (safety age 0) volumes that no second
        // writer ever takes over; a driver refuses that configuration.
        allow_short_safety_age: true,
        compaction: s3blk::controller::CompactionMode::Store,
        metrics_address: Some("127.0.0.1:0".into()),
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(s3blk::csi::server::run(cfg.clone(), stores.clone(), async move {
        let _ = rx.await;
    }));
    for _ in 0..250 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let channel = common::grpc_channel(&sock).await;
    Some(Driver {
        ctl: ControllerClient::new(channel.clone()),
        id: IdentityClient::new(channel),
        bucket,
        store,
        sock,
        _dir: dir,
        stop: Some(tx),
        task,
        cfg,
        stores,
    })
}

fn secrets() -> HashMap<String, String> {
    let ep = common::s3_endpoint().expect("endpoint");
    HashMap::from([
        ("endpoint".to_string(), ep),
        ("accessKeyID".to_string(), "testing".to_string()),
        ("secretAccessKey".to_string(), "testing".to_string()),
    ])
}

fn mount_cap(mode: pb::volume_capability::access_mode::Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Mount(pb::volume_capability::MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
        access_mode: Some(pb::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

fn rwo() -> pb::VolumeCapability {
    mount_cap(pb::volume_capability::access_mode::Mode::SingleNodeWriter)
}

fn create_req(name: &str, required: i64, limit: i64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange { required_bytes: required, limit_bytes: limit }),
        volume_capabilities: vec![rwo()],
        parameters: HashMap::from([("chunkSize".into(), "64KiB".into())]),
        secrets: secrets(),
        ..Default::default()
    }
}

async fn create(d: &mut Driver, name: &str, size: i64) -> pb::Volume {
    d.ctl.create_volume(create_req(name, size, 0)).await.expect("create").into_inner().volume.expect("volume")
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

fn prefix_of(volume_id: &str) -> String {
    Location::parse(volume_id, true).expect("volume id").prefix
}

async fn write(d: &Driver, volume_id: &str, offset: u64, data: &[u8]) {
    let v = Volume::open(d.store.clone(), &prefix_of(volume_id), OpenOptions::default()).await.expect("open");
    v.write(offset, data).await.expect("write");
    v.flush().await.expect("flush");
}

async fn read(d: &Driver, volume_id: &str, offset: u64, len: u64) -> Vec<u8> {
    let v =
        Volume::open(d.store.clone(), &prefix_of(volume_id), OpenOptions { read_only: true, ..OpenOptions::default() })
            .await
            .expect("open");
    v.read(offset, len).await.expect("read")
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_reports_name_capabilities_and_probes_the_store() {
    let Some(mut d) = driver().await else { return };
    let info = d.id.get_plugin_info(pb::GetPluginInfoRequest {}).await.expect("info").into_inner();
    assert_eq!(info.name, "csi.s3blk.dev");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = d.id.get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {}).await.expect("caps").into_inner();
    let text = format!("{caps:?}");
    assert!(text.contains("VolumeExpansion") && text.contains("Service"), "{text}");
    let probe = d.id.probe(pb::ProbeRequest {}).await.expect("probe").into_inner();
    assert_eq!(probe.ready, Some(true));
    let ctl = d.ctl.controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {}).await.expect("caps");
    use pb::controller_service_capability::{Type, rpc::Type as T};
    let rpcs: Vec<i32> = ctl
        .into_inner()
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(Type::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect();
    assert_eq!(rpcs.len(), 10, "{rpcs:?}");
    // GET_CAPACITY only with the provisioner's capacity tracking (the
    // chart's controller.capacityTracking, `--capacity-tracking`).
    assert!(!rpcs.contains(&(T::GetCapacity as i32)), "{rpcs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_is_idempotent_rounds_capacity_and_rejects_bad_requests() {
    let Some(mut d) = driver().await else { return };
    let v = create(&mut d, "pvc-one", 1).await;
    assert_eq!(v.capacity_bytes, 64 << 10, "rounded up to one chunk");
    assert!(v.volume_id.starts_with(&format!("s3://{}/k8s/", d.bucket)), "{}", v.volume_id);
    let again = create(&mut d, "pvc-one", 1).await;
    assert_eq!(again.volume_id, v.volume_id, "same name, same volume");
    assert_eq!(code(d.ctl.create_volume(create_req("pvc-one", 10 << 20, 0)).await), Code::AlreadyExists);
    let exact = d.ctl.create_volume(create_req("pvc-exact", 5000, 8192)).await.expect("create").into_inner();
    assert_eq!(exact.volume.expect("volume").capacity_bytes, 8192, "block granularity inside a tight limit");
    assert_eq!(code(d.ctl.create_volume(create_req("pvc-tight", 5000, 5000)).await), Code::OutOfRange);
    assert_eq!(code(d.ctl.create_volume(create_req("pvc-neg", -5, 0)).await), Code::InvalidArgument);
    assert_eq!(code(d.ctl.create_volume(create_req("", 1, 0)).await), Code::InvalidArgument);
    let mut no_caps = create_req("pvc-nocaps", 1, 0);
    no_caps.volume_capabilities.clear();
    assert_eq!(code(d.ctl.create_volume(no_caps).await), Code::InvalidArgument);
    let mut multi = create_req("pvc-rwx", 1, 0);
    multi.volume_capabilities = vec![mount_cap(pb::volume_capability::access_mode::Mode::MultiNodeMultiWriter)];
    assert_eq!(code(d.ctl.create_volume(multi).await), Code::InvalidArgument);
    let mut bad_param = create_req("pvc-param", 1, 0);
    bad_param.parameters.insert("chunkSize".into(), "3000".into());
    assert_eq!(code(d.ctl.create_volume(bad_param).await), Code::InvalidArgument);
    // None of the refused requests created anything.
    let list = d.ctl.list_volumes(pb::ListVolumesRequest::default()).await.expect("list").into_inner();
    assert_eq!(list.entries.len(), 2, "{list:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_name_make_one_volume() {
    let Some(d) = driver().await else { return };
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let mut c = d.ctl.clone();
        tasks.push(tokio::spawn(async move { c.create_volume(create_req("pvc-race", 1 << 20, 0)).await }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        match t.await.expect("task") {
            Ok(r) => {
                ids.insert(r.into_inner().volume.expect("volume").volume_id);
            }
            Err(s) => assert_eq!(s.code(), Code::Aborted, "{s}"),
        }
    }
    assert_eq!(ids.len(), 1);
}

/// While the controller's flatten holds a volume's writer lease, a
/// read-write ControllerPublish answers UNAVAILABLE (its attachment is
/// written first, which the flatten sees and stops for); once the lease
/// is gone, the retry publishes. A lease of another command (a CLI serve)
/// does not hold a publish back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_waits_while_the_controller_flattens_the_volume() {
    use s3blk::clock::SystemClock;
    use s3blk::volume::lease::{LEASE_TTL, Lease};
    let Some(mut d) = driver().await else { return };
    let v = create(&mut d, "pvc-flat", 1 << 20).await;
    let prefix = prefix_of(&v.volume_id);
    let publish = publish_req(&v.volume_id, "node-a", false);
    let flatten = s3blk::controller::reconcile::FLATTEN_LEASE;
    let held = Lease::acquire(&d.store, &prefix, flatten, false, LEASE_TTL, &SystemClock).await.expect("lease");
    let refused = d.ctl.controller_publish_volume(publish.clone()).await;
    assert_eq!(code(refused), Code::Unavailable);
    let attached = s3blk::volume::catalog::attachments(&d.store, &prefix).await.expect("attachments");
    assert_eq!(attached.len(), 1, "the attachment the flatten stops for");
    held.release().await;
    d.ctl.controller_publish_volume(publish.clone()).await.expect("published once the flatten let go");
    let unpub = pb::ControllerUnpublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: "node-a".into(),
        secrets: secrets(),
    };
    d.ctl.controller_unpublish_volume(unpub).await.expect("unpublish");
    let other = Lease::acquire(&d.store, &prefix, "serve", false, LEASE_TTL, &SystemClock).await.expect("lease");
    d.ctl.controller_publish_volume(publish).await.expect("another command's lease holds nothing back");
    other.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_fences_a_second_writer_node() {
    let Some(mut d) = driver().await else { return };
    let v = create(&mut d, "pvc-pub", 1 << 20).await;
    let publish = |node: &str, ro: bool| publish_req(&v.volume_id, node, ro);
    let ctx = d.ctl.controller_publish_volume(publish("node-a", false)).await.expect("publish").into_inner();
    assert_eq!(ctx.publish_context["readonly"], "false");
    d.ctl.controller_publish_volume(publish("node-a", false)).await.expect("idempotent publish");
    assert_eq!(code(d.ctl.controller_publish_volume(publish("node-b", false)).await), Code::FailedPrecondition);
    assert_eq!(code(d.ctl.controller_publish_volume(publish("node-a", true)).await), Code::AlreadyExists);
    assert_eq!(code(d.ctl.controller_publish_volume(publish("", false)).await), Code::InvalidArgument);
    let mut missing = publish("node-a", false);
    missing.volume_id = format!("s3://{}/k8s/nope", d.bucket);
    assert_eq!(code(d.ctl.controller_publish_volume(missing).await), Code::NotFound);
    let mut garbage = publish("node-a", false);
    garbage.volume_id = "not a volume id".into();
    assert_eq!(code(d.ctl.controller_publish_volume(garbage).await), Code::NotFound);
    let got = d.ctl.controller_get_volume(pb::ControllerGetVolumeRequest { volume_id: v.volume_id.clone() }).await;
    assert_eq!(got.expect("get").into_inner().status.expect("status").published_node_ids, vec!["node-a"]);
    // Deleting a published volume is refused; unpublish then delete works.
    let del = pb::DeleteVolumeRequest { volume_id: v.volume_id.clone(), secrets: secrets() };
    assert_eq!(code(d.ctl.delete_volume(del.clone()).await), Code::FailedPrecondition);
    let unpub = pb::ControllerUnpublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: "node-a".into(),
        secrets: secrets(),
    };
    d.ctl.controller_unpublish_volume(unpub.clone()).await.expect("unpublish");
    d.ctl.controller_unpublish_volume(unpub).await.expect("unpublish again");
    d.ctl.controller_publish_volume(publish("node-b", false)).await.expect("now node-b may write");
    d.ctl
        .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: String::new(),
            secrets: secrets(),
        })
        .await
        .expect("unpublish everywhere");
    d.ctl.delete_volume(del.clone()).await.expect("delete");
    d.ctl.delete_volume(del).await.expect("delete is idempotent");
    d.ctl
        .delete_volume(pb::DeleteVolumeRequest { volume_id: "garbage".into(), secrets: secrets() })
        .await
        .expect("an unknown id is already deleted");
    assert_eq!(
        code(d.ctl.delete_volume(pb::DeleteVolumeRequest { volume_id: String::new(), secrets: secrets() }).await),
        Code::InvalidArgument
    );
    let left = s3blk::store::list_all(d.store.as_ref(), &prefix_of(&v.volume_id)).await.expect("list");
    assert!(left.is_empty(), "deleted volume left objects: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_volumes_paginates_and_validate_checks_capabilities() {
    let Some(mut d) = driver().await else { return };
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(create(&mut d, &format!("pvc-list-{i}"), 1 << 20).await.volume_id);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = d
            .ctl
            .list_volumes(pb::ListVolumesRequest { max_entries: 2, starting_token: token.clone() })
            .await
            .expect("list")
            .into_inner();
        assert!(r.entries.len() <= 2);
        seen.extend(r.entries.into_iter().map(|e| e.volume.expect("volume").volume_id));
        pages += 1;
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    assert_eq!(pages, 3);
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);
    assert_eq!(
        code(d.ctl.list_volumes(pb::ListVolumesRequest { max_entries: 0, starting_token: "zz".into() }).await),
        Code::Aborted
    );
    assert_eq!(
        code(d.ctl.list_volumes(pb::ListVolumesRequest { max_entries: -1, ..Default::default() }).await),
        Code::InvalidArgument
    );

    let validate = |caps: Vec<pb::VolumeCapability>| pb::ValidateVolumeCapabilitiesRequest {
        volume_id: ids[0].clone(),
        volume_capabilities: caps,
        secrets: secrets(),
        ..Default::default()
    };
    let ok = d.ctl.validate_volume_capabilities(validate(vec![rwo()])).await.expect("validate").into_inner();
    assert!(ok.confirmed.is_some());
    let no = d
        .ctl
        .validate_volume_capabilities(validate(vec![mount_cap(
            pb::volume_capability::access_mode::Mode::MultiNodeMultiWriter,
        )]))
        .await
        .expect("validate")
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty());
    assert_eq!(code(d.ctl.validate_volume_capabilities(validate(vec![])).await), Code::InvalidArgument);
    let mut gone = validate(vec![rwo()]);
    gone.volume_id = format!("s3://{}/k8s/missing", d.bucket);
    assert_eq!(code(d.ctl.validate_volume_capabilities(gone).await), Code::NotFound);
    let cap = d.ctl.get_capacity(pb::GetCapacityRequest::default()).await.expect("capacity").into_inner();
    assert_eq!(cap.available_capacity, 1 << 50);
}

/// CreateSnapshot of `volume_id` named `name`; the snapshot it answers.
async fn snapshot(d: &Driver, volume_id: &str, name: &str) -> pb::Snapshot {
    let req = pb::CreateSnapshotRequest {
        source_volume_id: volume_id.to_string(),
        name: name.into(),
        secrets: secrets(),
        parameters: HashMap::new(),
    };
    d.ctl.clone().create_snapshot(req).await.expect("snapshot").into_inner().snapshot.expect("snapshot")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_clones_restore_the_right_bytes() {
    let Some(mut d) = driver().await else { return };
    let src = create(&mut d, "pvc-src", 1 << 20).await;
    let first = common::pattern(1, 200_000);
    write(&d, &src.volume_id, 1000, &first).await;
    let snap_req = |name: &str, vol: &str| pb::CreateSnapshotRequest {
        source_volume_id: vol.into(),
        name: name.into(),
        secrets: secrets(),
        parameters: HashMap::new(),
    };
    let snap = d.ctl.create_snapshot(snap_req("snap-1", &src.volume_id)).await.expect("snapshot").into_inner();
    let snap = snap.snapshot.expect("snapshot");
    assert!(snap.ready_to_use);
    assert_eq!(snap.source_volume_id, src.volume_id);
    let again = d.ctl.create_snapshot(snap_req("snap-1", &src.volume_id)).await.expect("idempotent").into_inner();
    assert_eq!(again.snapshot.expect("snapshot").snapshot_id, snap.snapshot_id);
    let other = create(&mut d, "pvc-other", 1 << 20).await;
    assert_eq!(code(d.ctl.create_snapshot(snap_req("snap-1", &other.volume_id)).await), Code::AlreadyExists);
    assert_eq!(code(d.ctl.create_snapshot(snap_req("", &src.volume_id)).await), Code::InvalidArgument);

    // The source moves on; the snapshot does not.
    let second = common::pattern(2, 100_000);
    write(&d, &src.volume_id, 1000, &second).await;

    let from_snap = |name: &str, size: i64, limit: i64| {
        let mut r = create_req(name, size, limit);
        r.volume_content_source = Some(pb::VolumeContentSource {
            r#type: Some(pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            })),
        });
        r
    };
    let restored = d.ctl.create_volume(from_snap("pvc-restored", 2 << 20, 0)).await.expect("restore").into_inner();
    let restored = restored.volume.expect("volume");
    assert_eq!(restored.capacity_bytes, 2 << 20);
    assert_eq!(read(&d, &restored.volume_id, 1000, first.len() as u64).await, first);
    // A limit below the snapshot's size cannot be honoured.
    assert_eq!(code(d.ctl.create_volume(from_snap("pvc-small", 4096, 8192)).await), Code::OutOfRange);

    // Clone of the live volume: its current bytes.
    let mut clone_req = create_req("pvc-clone", 1 << 20, 0);
    clone_req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
            volume_id: src.volume_id.clone(),
        })),
    });
    let clone = d.ctl.create_volume(clone_req.clone()).await.expect("clone").into_inner().volume.expect("volume");
    let mut expect = first.clone();
    expect[..second.len()].copy_from_slice(&second);
    assert_eq!(read(&d, &clone.volume_id, 1000, expect.len() as u64).await, expect);
    // Writing the clone leaves the source alone, and a clone of the clone sees both layers.
    write(&d, &clone.volume_id, 0, b"clone-only").await;
    assert_ne!(read(&d, &src.volume_id, 0, 10).await, b"clone-only");
    let mut cc = create_req("pvc-clone2", 1 << 20, 0);
    cc.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
            volume_id: clone.volume_id.clone(),
        })),
    });
    let clone2 = d.ctl.create_volume(cc.clone()).await.expect("clone of clone").into_inner().volume.expect("volume");
    assert_eq!(read(&d, &clone2.volume_id, 0, 10).await, b"clone-only");
    assert_eq!(read(&d, &clone2.volume_id, 1000 + 150_000, 10).await, expect[150_000..150_010]);
    // Flattened (the chunks of both ancestors copied), the clone of the
    // clone reads the same, and a CreateVolume asked again (its pin in the
    // source is gone) answers with it.
    let prefix = prefix_of(&clone2.volume_id);
    let v = Volume::open(d.store.clone(), &prefix, OpenOptions::default()).await.expect("open");
    let copied = v.copy_parents(&|_, _| {}).await.expect("copy");
    drop(v);
    let out = s3blk::volume::catalog::let_go_of_parent(&d.store, &prefix, Some(copied.seq)).await.expect("let go");
    assert!(matches!(out, s3blk::volume::catalog::ParentOutcome::LetGo { .. }), "{out:?}");
    let again = d.ctl.create_volume(cc).await.expect("asked again after the flatten").into_inner();
    assert_eq!(again.volume.expect("volume").volume_id, clone2.volume_id);
    // A snapshot record of the flattened volume at a seq before its flatten
    // (a PUT that landed after its CreateSnapshot gave up): a retried
    // CreateSnapshot takes it back and takes the snapshot again.
    let late = format::SnapshotRecord {
        format_version: format::FORMAT_V1,
        name: "snap-late".into(),
        seq: 0,
        size: 1 << 20,
        created_unix: 0,
        token: Some(7),
        clone: None,
        auth: None,
    };
    let key = format::snapshot_key(&prefix, "snap-late");
    let body = serde_json::to_vec(&late).expect("json");
    d.store.put(&key, body.into(), PutMode::IfAbsent).await.expect("the late record");
    let taken = d.ctl.create_snapshot(snap_req("snap-late", &clone2.volume_id)).await.expect("snapshot").into_inner();
    let rec = s3blk::volume::engine::read_snapshot(&d.store, &prefix, "snap-late").await.expect("record");
    assert!(rec.seq >= copied.seq && rec.token != Some(7), "{rec:?}");
    let ro = OpenOptions { read_only: true, snapshot: Some("snap-late".into()), ..OpenOptions::default() };
    let at = Volume::open(d.store.clone(), &prefix, ro).await.expect("the snapshot opens");
    assert_eq!(at.read(0, 10).await.expect("read"), b"clone-only");
    assert!(taken.snapshot.expect("snapshot").ready_to_use);
    assert_eq!(read(&d, &clone2.volume_id, 0, 10).await, b"clone-only");
    assert_eq!(read(&d, &clone2.volume_id, 1000 + 150_000, 10).await, expect[150_000..150_010]);

    // ListSnapshots: by id, by source, all.
    let by_id = d
        .ctl
        .list_snapshots(pb::ListSnapshotsRequest { snapshot_id: snap.snapshot_id.clone(), ..Default::default() })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(by_id.entries.len(), 1);
    let missing = d
        .ctl
        .list_snapshots(pb::ListSnapshotsRequest {
            snapshot_id: format!("{}@nope", src.volume_id),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(missing.entries.is_empty());
    d.ctl.create_snapshot(snap_req("snap-2", &src.volume_id)).await.expect("snapshot 2");
    let by_src = d
        .ctl
        .list_snapshots(pb::ListSnapshotsRequest {
            source_volume_id: src.volume_id.clone(),
            max_entries: 1,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(by_src.entries.len(), 1);
    assert!(!by_src.next_token.is_empty());

    // Deleting the source while snapshots and clones depend on it hides it
    // but keeps its chunks; the restored volume still reads.
    d.ctl
        .delete_volume(pb::DeleteVolumeRequest { volume_id: src.volume_id.clone(), secrets: secrets() })
        .await
        .expect("delete src");
    let ids: Vec<String> = d
        .ctl
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.expect("volume").volume_id)
        .collect();
    assert!(!ids.contains(&src.volume_id));
    assert_eq!(read(&d, &restored.volume_id, 1000, first.len() as u64).await, first);
    // A CreateVolume asked again (the CO lost the answer) after its source
    // went answers with the volume it made: the clone of the deleted
    // volume, and (below) the restore of a deleted snapshot. A new name
    // from a gone source is still NOT_FOUND.
    let again = d.ctl.create_volume(clone_req.clone()).await.expect("the clone asked again after its source went");
    assert_eq!(again.into_inner().volume.expect("volume").volume_id, clone.volume_id);
    clone_req.name = "pvc-clone-new".into();
    assert_eq!(code(d.ctl.create_volume(clone_req).await), Code::NotFound);
    let sid = format!("{}@snap-1", src.volume_id);
    d.ctl
        .delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: sid, secrets: secrets() })
        .await
        .expect("delete snap-1");
    let again = d.ctl.create_volume(from_snap("pvc-restored", 2 << 20, 0)).await.expect("restore asked again");
    assert_eq!(again.into_inner().volume.expect("volume").volume_id, restored.volume_id);
    assert_eq!(code(d.ctl.create_volume(from_snap("pvc-restored-new", 2 << 20, 0)).await), Code::NotFound);
    // Asked again with another gone source, the volume is not the answer.
    let mut other_src = from_snap("pvc-restored", 2 << 20, 0);
    other_src.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
            volume_id: other.volume_id.replace("pvc-other", "pvc-never"),
        })),
    });
    assert_eq!(code(d.ctl.create_volume(other_src).await), Code::AlreadyExists);
    // When the last dependant goes, the source's objects go too.
    for id in [&clone2.volume_id, &clone.volume_id, &restored.volume_id] {
        d.ctl
            .delete_volume(pb::DeleteVolumeRequest { volume_id: id.clone(), secrets: secrets() })
            .await
            .expect("delete");
    }
    for name in ["snap-1", "snap-2"] {
        let sid = format!("{}@{name}", src.volume_id);
        d.ctl
            .delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: sid.clone(), secrets: secrets() })
            .await
            .expect("delete");
        d.ctl.delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: sid, secrets: secrets() }).await.expect("again");
    }
    let left = s3blk::store::list_all(d.store.as_ref(), &prefix_of(&src.volume_id)).await.expect("list");
    assert!(left.is_empty(), "source not reaped: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expand_grows_offline_volumes_and_defers_to_the_node_when_attached() {
    let Some(mut d) = driver().await else { return };
    let v = create(&mut d, "pvc-grow", 1 << 20).await;
    write(&d, &v.volume_id, 10, b"keep me").await;
    let expand = |bytes: i64| pb::ControllerExpandVolumeRequest {
        volume_id: v.volume_id.clone(),
        capacity_range: Some(pb::CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        secrets: secrets(),
        volume_capability: Some(rwo()),
    };
    let r = d.ctl.controller_expand_volume(expand(3 << 20)).await.expect("expand").into_inner();
    assert_eq!(r.capacity_bytes, 3 << 20);
    assert!(r.node_expansion_required, "a filesystem must be grown on the node");
    assert_eq!(read(&d, &v.volume_id, 10, 7).await, b"keep me");
    let smaller = d.ctl.controller_expand_volume(expand(1 << 20)).await.expect("no shrink").into_inner();
    assert_eq!(smaller.capacity_bytes, 3 << 20);
    assert_eq!(
        code(
            d.ctl
                .controller_expand_volume(pb::ControllerExpandVolumeRequest { capacity_range: None, ..expand(1) })
                .await
        ),
        Code::InvalidArgument
    );
    d.ctl.controller_publish_volume(publish_req(&v.volume_id, "node-a", false)).await.expect("publish");
    let r = d.ctl.controller_expand_volume(expand(5 << 20)).await.expect("expand attached").into_inner();
    assert!(r.node_expansion_required);
    let got = d.ctl.controller_get_volume(pb::ControllerGetVolumeRequest { volume_id: v.volume_id.clone() }).await;
    assert_eq!(
        got.expect("get").into_inner().volume.expect("volume").capacity_bytes,
        3 << 20,
        "the attached writer grows it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_appear_in_errors() {
    let Some(mut d) = driver().await else { return };
    let mut req = create_req("pvc-secret", 1 << 20, 0);
    // A closed port: every call fails, and the error travels back to the CO.
    req.secrets = HashMap::from([
        ("endpoint".to_string(), "http://127.0.0.1:9".to_string()),
        ("accessKeyID".to_string(), "AKIDLEAKCHECK".to_string()),
        ("secretAccessKey".to_string(), "TOPSECRET-do-not-log".to_string()),
    ]);
    let err = d.ctl.create_volume(req).await.expect_err("the store is unreachable");
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    let text = format!("{err:?}");
    assert!(!text.contains("TOPSECRET") && !text.contains("AKIDLEAKCHECK"), "secret leaked: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_prometheus_text() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(s3blk::metrics::serve(l));
    // Real traffic through the store stack shows up as store counters.
    let store: DynStore =
        s3blk::store::layered(Arc::new(s3blk::store::memory::MemoryStore::new()), common::fast_policy());
    store.head("x").await.expect("head");
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    };
    let text = get("/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.contains("# TYPE s3blk_store_requests_total counter"), "{text}");
    assert!(text.contains("s3blk_store_requests_total{op=\"HEAD\"}"), "{text}");
    assert!(get("/healthz").await.ends_with("ok\n"));
    assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_compacts_every_volume_in_the_background() {
    // A pass every second, nothing too young to collect: superseded chunk
    // generations of a volume written three times disappear on their own.
    let Some(mut d) = driver_with(std::time::Duration::from_secs(1), std::time::Duration::ZERO).await else { return };
    let vol = create(&mut d, "pvc-compact", 4 << 20).await;
    for seed in 0..3 {
        write(&d, &vol.volume_id, 0, &common::pattern(seed, 1 << 20)).await;
    }
    let chunks = format!("{}chunks/", prefix_of(&vol.volume_id));
    let count = |store: DynStore, chunks: String| async move {
        s3blk::store::list_all(store.as_ref(), &chunks).await.expect("list").len()
    };
    // One generation of each chunk stays (the loop may have collected
    // some of the older ones while the writes went on).
    let per_write = (1usize << 20).div_ceil(chunk_size(&d.store, &vol.volume_id).await);
    let written = count(d.store.clone(), chunks.clone()).await;
    assert!(written >= per_write, "{written} chunk objects");
    let left = common::poll_until(|| count(d.store.clone(), chunks.clone()), |n| *n == per_write).await;
    assert_eq!(left, per_write, "the reconcile loop did not collect the superseded generations");
    assert_eq!(read(&d, &vol.volume_id, 0, 1 << 20).await, common::pattern(2, 1 << 20));
    let journal = format!("{}journal/", prefix_of(&vol.volume_id));
    assert_eq!(s3blk::store::list_all(d.store.as_ref(), &journal).await.expect("list").len(), 1, "journal folded");

    // A deleted volume kept for its snapshot is reaped by the loop once the
    // snapshot is gone by other means (here: its record removed directly).
    let req = pb::CreateSnapshotRequest {
        source_volume_id: vol.volume_id.clone(),
        name: "snap-keep".into(),
        secrets: secrets(),
        parameters: HashMap::new(),
    };
    d.ctl.create_snapshot(req).await.expect("snapshot");
    let del = pb::DeleteVolumeRequest { volume_id: vol.volume_id.clone(), secrets: secrets() };
    d.ctl.delete_volume(del).await.expect("delete keeps the objects for the snapshot");
    let prefix = prefix_of(&vol.volume_id);
    assert!(!s3blk::store::list_all(d.store.as_ref(), &prefix).await.expect("list").is_empty());
    for o in s3blk::store::list_all(d.store.as_ref(), &format!("{prefix}snapshots/")).await.expect("list") {
        d.store.delete(&o.key).await.expect("delete snapshot record");
    }
    let left = common::poll_until(
        || async { s3blk::store::list_all(d.store.as_ref(), &prefix).await.expect("list").len() },
        |n| *n == 0,
    )
    .await;
    assert_eq!(left, 0, "the deleted volume was not reaped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_compacts_volumes_in_every_store_it_provisioned_into() {
    // A safety age of 2 s, not 0: the test writes the volume while the
    // loop compacts it every second, and with no safety age a pass may
    // collect a flush's chunks between their upload and their commit
    // (what the safety age is for), which failed this test once under load.
    let safety_age = std::time::Duration::from_secs(2);
    let Some(mut d) = driver_with(std::time::Duration::from_secs(1), safety_age).await else { return };
    let (bucket2, store2) = second_bucket().await;
    let mut req = create_req("pvc-away-compact", 4 << 20, 0);
    req.parameters.insert("bucket".into(), bucket2);
    let vol = d.ctl.create_volume(req).await.expect("create in bucket 2").into_inner().volume.expect("v");
    let prefix = prefix_of(&vol.volume_id);
    for seed in 0..3 {
        let v = Volume::open(store2.clone(), &prefix, OpenOptions::default()).await.expect("open");
        v.write(0, &common::pattern(seed, 1 << 20)).await.expect("write");
        v.flush().await.expect("flush");
    }
    let chunks = format!("{prefix}chunks/");
    let count = || async { s3blk::store::list_all(store2.as_ref(), &chunks).await.expect("list").len() };
    let per_write = (1usize << 20).div_ceil(chunk_size(&store2, &vol.volume_id).await);
    let written = count().await;
    assert!(written >= per_write, "{written} chunk objects");
    let left = common::poll_until(count, |n| *n == per_write).await;
    assert_eq!(left, per_write, "the volume in the other bucket was not compacted");
}

/// The chunk size the volume was made with.
async fn chunk_size(store: &DynStore, volume_id: &str) -> usize {
    s3blk::volume::replay::read_meta(store.as_ref(), &prefix_of(volume_id)).await.expect("volume.json").chunk_size
        as usize
}

/// Logs of the whole test process, for checks that something was logged.
fn captured_logs() -> Arc<std::sync::Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = buf.clone();
        let writer = move || LogSink(sink.clone());
        let _ = tracing_subscriber::fmt().with_ansi(false).with_writer(writer).try_init();
        buf
    })
    .clone()
}

struct LogSink(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn put(d: &Driver, key: &str, body: &'static [u8]) {
    d.store.put(key, bytes::Bytes::from_static(body), s3blk::store::PutMode::Overwrite).await.expect("put");
}

async fn keys_under(d: &Driver, prefix: &str) -> Vec<String> {
    s3blk::store::list_all(d.store.as_ref(), prefix).await.expect("list").into_iter().map(|o| o.key).collect()
}

fn delete_req(id: &str) -> pb::DeleteVolumeRequest {
    pb::DeleteVolumeRequest { volume_id: id.into(), secrets: secrets() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_volume_never_deletes_what_s3blk_does_not_own() {
    let logs = captured_logs();
    let Some(mut d) = driver().await else { return };
    let a = create(&mut d, "pvc-a", 1 << 20).await;
    let b = create(&mut d, "pvc-b", 1 << 20).await;
    write(&d, &a.volume_id, 0, b"volume a").await;
    write(&d, &b.volume_id, 0, b"volume b").await;
    put(&d, "unrelated/data/report.csv", b"not written by s3blk").await;
    put(&d, "k8s/notes/readme.txt", b"an operator's notes beside the volumes").await;
    let bucket = d.bucket.clone();

    // A prefix of the same bucket outside the store, and the store root itself.
    for id in
        [format!("s3://{bucket}/unrelated/data"), format!("s3://{bucket}/unrelated"), format!("s3://{bucket}/k8s")]
    {
        let err = d.ctl.delete_volume(delete_req(&id)).await.expect_err(&id);
        assert_eq!(err.code(), Code::InvalidArgument, "{id}: {err}");
        assert!(err.message().contains("outside the stores"), "{err}");
    }
    // The bucket root is no volume id at all: nothing to delete.
    d.ctl.delete_volume(delete_req(&format!("s3://{bucket}"))).await.expect("bucket root");
    // A name in the store holding someone else's objects is no volume.
    let err = d.ctl.delete_volume(delete_req(&format!("s3://{bucket}/k8s/notes"))).await.expect_err("notes");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("did not write"), "{err}");

    // A volume whose prefix holds another volume (made there by hand) is left whole.
    let inner = format!("{}inner/", prefix_of(&a.volume_id));
    let opts = s3blk::volume::engine::CreateOptions::new(1 << 20, 64 << 10);
    Volume::create(d.store.clone(), &inner, opts, &s3blk::clock::SystemClock).await.expect("nested volume");
    let err = d.ctl.delete_volume(delete_req(&a.volume_id)).await.expect_err("nested");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("holds another volume"), "{err}");

    // Nothing above touched anything.
    assert_eq!(keys_under(&d, "unrelated/").await, vec!["unrelated/data/report.csv"]);
    assert_eq!(keys_under(&d, "k8s/notes/").await, vec!["k8s/notes/readme.txt"]);
    assert!(!keys_under(&d, &inner).await.is_empty());
    assert_eq!(read(&d, &a.volume_id, 0, 8).await, b"volume a");
    assert_eq!(read(&d, &b.volume_id, 0, 8).await, b"volume b");
    let list = d.ctl.list_volumes(pb::ListVolumesRequest::default()).await.expect("list").into_inner();
    assert_eq!(list.entries.len(), 2, "{list:?}");

    // A volume of the store goes, logged with its object count; deleting it again is fine.
    let objects = keys_under(&d, &prefix_of(&b.volume_id)).await.len();
    d.ctl.delete_volume(delete_req(&b.volume_id)).await.expect("delete b");
    assert!(keys_under(&d, &prefix_of(&b.volume_id)).await.is_empty());
    d.ctl.delete_volume(delete_req(&b.volume_id)).await.expect("delete b again");
    let text = String::from_utf8_lossy(&logs.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    let line = text.lines().find(|l| l.contains("volume deleted") && l.contains(&b.volume_id));
    let line = line.unwrap_or_else(|| panic!("no log line for the deletion of {}:\n{text}", b.volume_id));
    // The tombstone is one object more than the volume had.
    assert!(line.contains(&format!("objects={}", objects + 1)), "{line}");
    assert_eq!(read(&d, &a.volume_id, 0, 8).await, b"volume a");

    // A store a StorageClass named is served as well, once provisioned into.
    let mut team = create_req("pvc-team", 1 << 20, 0);
    team.parameters.extend([("bucket".to_string(), bucket.clone()), ("prefix".to_string(), "team".to_string())]);
    let t = d.ctl.create_volume(team).await.expect("create").into_inner().volume.expect("volume");
    assert_eq!(t.volume_id, format!("s3://{bucket}/team/pvc-team"));
    d.ctl.delete_volume(delete_req(&t.volume_id)).await.expect("delete in a StorageClass's store");
    assert!(keys_under(&d, "team/pvc-team/").await.is_empty());
    d.ctl.delete_volume(delete_req(&t.volume_id)).await.expect("and again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_volume_never_touches_the_controllers_own_files() {
    let Some(mut d) = driver().await else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = dir.path().join("vol");
    std::fs::create_dir(&plain).expect("mkdir");
    std::fs::write(plain.join("file"), b"keep me").expect("write");
    // Even a real s3blk volume in a directory the driver does not serve.
    let local = common::local_store(dir.path());
    let opts = s3blk::volume::engine::CreateOptions::new(1 << 20, 64 << 10);
    Volume::create(local.clone(), "real/", opts, &s3blk::clock::SystemClock).await.expect("local volume");
    let path = plain.to_str().expect("path").to_string();
    // A plain path is no volume id this driver issues: OK, nothing touched.
    d.ctl.delete_volume(delete_req(&path)).await.expect("a path names no volume");
    for id in [format!("file://{path}"), format!("file://{}/real", dir.path().display())] {
        let err = d.ctl.delete_volume(delete_req(&id)).await.expect_err(&id);
        assert_eq!(err.code(), Code::InvalidArgument, "{id}: {err}");
    }
    assert_eq!(std::fs::read(plain.join("file")).expect("the file is still there"), b"keep me");
    assert!(dir.path().join("real/volume.json").is_file(), "the local volume was touched");
    // Nor can a StorageClass send the controller to a directory of its host.
    let mut req = create_req("pvc-local", 1 << 20, 0);
    req.parameters.insert("store".into(), format!("file://{}", dir.path().display()));
    assert_eq!(code(d.ctl.create_volume(req).await), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tombstoned_remains_are_reaped() {
    let Some(mut d) = driver_with(std::time::Duration::from_secs(1), std::time::Duration::ZERO).await else { return };
    let gone = create(&mut d, "pvc-gone", 1 << 20).await;
    let half = create(&mut d, "pvc-half", 1 << 20).await;
    let cut = create(&mut d, "pvc-cut", 1 << 20).await;
    for v in [&gone, &half, &cut] {
        write(&d, &v.volume_id, 0, &common::pattern(5, 200_000)).await;
    }
    let (gone_p, half_p, cut_p) = (prefix_of(&gone.volume_id), prefix_of(&half.volume_id), prefix_of(&cut.volume_id));
    // Deletes that died after the tombstone and volume.json went: s3blk's own remains.
    for p in [&gone_p, &cut_p] {
        put(&d, &format!("{p}deleted.json"), b"{\"deleted_unix\":0}").await;
        d.store.delete(&format!("{p}volume.json")).await.expect("delete volume.json");
    }
    // No volume.json and no tombstone: nothing proves these objects are a
    // deleted volume's, so they stay.
    d.store.delete(&format!("{half_p}volume.json")).await.expect("delete volume.json");
    // A compaction pass of the loop may be under way there: it takes back
    // what it wrote (its clock probe, a checkpoint) once it sees
    // volume.json gone. The objects left are those two listings a pass
    // interval apart agree on.
    let mut half_keys = keys_under(&d, &half_p).await;
    for _ in 0..60 {
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let now = keys_under(&d, &half_p).await;
        if now == half_keys {
            break;
        }
        half_keys = now;
    }
    assert!(!half_keys.is_empty());
    assert!(!half_keys.iter().any(|k| k.contains(".s3blk-clock-")), "{half_keys:?}");

    // DeleteVolume finishes an interrupted delete, and deletes nothing unproven.
    d.ctl.delete_volume(delete_req(&cut.volume_id)).await.expect("finish the delete");
    assert!(keys_under(&d, &cut_p).await.is_empty());
    d.ctl.delete_volume(delete_req(&half.volume_id)).await.expect("no volume there");
    assert_eq!(keys_under(&d, &half_p).await, half_keys);

    // The reconcile loop reaps the tombstoned remains...
    let left = common::poll_until(|| async { keys_under(&d, &gone_p).await.len() }, |n| *n == 0).await;
    assert_eq!(left, 0, "the remains of the interrupted delete were not reaped");
    // ...and, passes later, still not the unproven ones.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(keys_under(&d, &half_p).await, half_keys, "objects without a tombstone were deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_volume_outlives_its_snapshot() {
    use s3blk::volume::compact::{CompactOptions, compact};
    let Some(mut d) = driver().await else { return };
    let src = create(&mut d, "pvc-origin", 1 << 20).await;
    let before = common::pattern(21, 1 << 20);
    write(&d, &src.volume_id, 0, &before).await;
    let snap = snapshot(&d, &src.volume_id, "snap-gone").await;
    let mut restore = create_req("pvc-restored", 1 << 20, 0);
    restore.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    });
    let restored = d.ctl.create_volume(restore).await.expect("restore").into_inner().volume.expect("volume");
    // The source moves on over every chunk: only the snapshot's state still
    // refers to the first generation.
    write(&d, &src.volume_id, 0, &common::pattern(22, 1 << 20)).await;

    let del = pb::DeleteSnapshotRequest { snapshot_id: snap.snapshot_id.clone(), secrets: secrets() };
    d.ctl.delete_snapshot(del).await.expect("delete snapshot");
    let listed = d.ctl.list_snapshots(pb::ListSnapshotsRequest::default()).await.expect("list").into_inner();
    assert!(listed.entries.is_empty(), "the deleted snapshot is still listed: {listed:?}");

    // Compaction with every object past the safety age (ages are measured
    // on the store's clock, so the age is zero rather than the clock late).
    let eager = CompactOptions { safety_age: std::time::Duration::ZERO, ..CompactOptions::default() };
    let later = s3blk::clock::SystemClock;
    let src_p = prefix_of(&src.volume_id);
    compact(&d.store, &src_p, &eager, &later).await.expect("compact");
    assert_eq!(read(&d, &restored.volume_id, 0, 1 << 20).await, before, "the restored volume lost its data");

    // Once the restored volume goes, its pin goes, and the old data with the next compaction.
    d.ctl.delete_volume(delete_req(&restored.volume_id)).await.expect("delete restored");
    assert!(keys_under(&d, &format!("{src_p}snapshots/")).await.is_empty(), "pin left behind");
    let rep = compact(&d.store, &src_p, &eager, &later).await.expect("compact");
    assert_eq!(rep.chunks_deleted, 16, "{rep:?}");
    assert_eq!(read(&d, &src.volume_id, 0, 1 << 20).await, common::pattern(22, 1 << 20));
}

/// Another bucket on the test S3 server, and its store.
async fn second_bucket() -> (String, DynStore) {
    let bucket = common::unique("csi2");
    let raw = common::s3_raw_store(&bucket).await.expect("second bucket");
    (bucket, Arc::new(s3blk::store::retry::RetryStore::new(raw, common::fast_policy())))
}

fn block_rwo() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Block(Default::default())),
        access_mode: Some(pb::volume_capability::AccessMode {
            mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_with_the_same_name_and_other_parameters_is_already_exists() {
    let Some(mut d) = driver().await else { return };
    let (bucket2, store2) = second_bucket().await;
    let base = || {
        let mut r = create_req("pvc-params", 1 << 20, 0);
        r.parameters.insert("fsType".into(), "ext4".into());
        r
    };
    let v = d.ctl.create_volume(base()).await.expect("create").into_inner().volume.expect("volume");
    let again = d.ctl.create_volume(base()).await.expect("same request again").into_inner().volume.expect("volume");
    assert_eq!((again.volume_id.as_str(), again.capacity_bytes), (v.volume_id.as_str(), v.capacity_bytes));
    type Change = Box<dyn Fn(&mut pb::CreateVolumeRequest)>;
    let variants: Vec<(&str, Change)> = vec![
        ("chunkSize", Box::new(|r| drop(r.parameters.insert("chunkSize".into(), "128KiB".into())))),
        ("fsType", Box::new(|r| drop(r.parameters.insert("fsType".into(), "xfs".into())))),
        ("mkfsOptions", Box::new(|r| drop(r.parameters.insert("mkfsOptions".into(), "-m 0".into())))),
        ("capabilities", Box::new(|r| r.volume_capabilities = vec![block_rwo()])),
        ("size", Box::new(|r| r.capacity_range = Some(pb::CapacityRange { required_bytes: 8 << 20, limit_bytes: 0 }))),
    ];
    let (b1, b2) = (d.bucket.clone(), bucket2.clone());
    let mut variants = variants;
    variants.push((
        "prefix",
        Box::new(move |r| {
            r.parameters.insert("bucket".into(), b1.clone());
            r.parameters.insert("prefix".into(), "elsewhere".into());
        }),
    ));
    variants.push((
        "bucket",
        Box::new(move |r| {
            r.parameters.insert("bucket".into(), b2.clone());
            r.parameters.insert("prefix".into(), "k8s".into());
        }),
    ));
    let mut answers = Vec::new();
    for (what, change) in &variants {
        let mut r = base();
        change(&mut r);
        answers.push((*what, d.ctl.create_volume(r).await.map(|_| ()).map_err(|e| e.code())));
    }
    let want: Vec<_> = variants.iter().map(|(w, _)| (*w, Err(Code::AlreadyExists))).collect();
    assert_eq!(answers, want);
    assert!(s3blk::store::list_all(store2.as_ref(), "").await.expect("list").is_empty(), "nothing made in {bucket2}");
    let elsewhere = s3blk::store::list_all(d.store.as_ref(), "elsewhere/").await.expect("list");
    assert!(elsewhere.is_empty(), "nothing made under another prefix: {elsewhere:?}");
    // The original still answers as before.
    let again = d.ctl.create_volume(base()).await.expect("same request once more").into_inner().volume.expect("v");
    assert_eq!(again.volume_id, v.volume_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_or_restore_source_that_does_not_exist_is_not_found() {
    let Some(mut d) = driver().await else { return };
    let (bucket2, _store2) = second_bucket().await;
    let from = |src: pb::volume_content_source::Type| {
        let mut r = create_req("pvc-from", 1 << 20, 0);
        r.volume_content_source = Some(pb::VolumeContentSource { r#type: Some(src) });
        r
    };
    let vol =
        |id: String| pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource { volume_id: id });
    let snap = |id: String| {
        pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource { snapshot_id: id })
    };
    let mut answers = Vec::new();
    for (what, src) in [
        ("volume in this bucket", vol(format!("s3://{}/k8s/nope", d.bucket))),
        ("volume in another bucket", vol(format!("s3://{bucket2}/k8s/nope"))),
        ("volume id that is no URL", vol("nope".into())),
        ("snapshot in this bucket", snap(format!("s3://{}/k8s/nope@snap-1", d.bucket))),
        ("snapshot in another bucket", snap(format!("s3://{bucket2}/k8s/nope@snap-1"))),
    ] {
        let answer = d.ctl.create_volume(from(src)).await.map(|_| ()).map_err(|e| (e.code(), e.message().to_string()));
        answers.push((what, answer));
    }
    assert!(answers.iter().all(|(_, a)| matches!(a, Err((Code::NotFound, _)))), "{answers:#?}");
    // A real volume in another bucket: refused, in the user's terms.
    let mut elsewhere = create_req("pvc-elsewhere", 1 << 20, 0);
    elsewhere.parameters.insert("bucket".into(), bucket2.clone());
    let other = d.ctl.create_volume(elsewhere).await.expect("create in bucket 2").into_inner().volume.expect("v");
    let e = d.ctl.create_volume(from(vol(other.volume_id.clone()))).await.expect_err("cross-bucket clone");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains(&format!("bucket {bucket2}")) && e.message().contains("StorageClass"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_a_node_that_never_registered_is_not_found() {
    let Some(endpoint) = common::s3_endpoint() else { return };
    let stores = Arc::new(Stores::with_defaults(common::fast_policy(), common::s3_settings(&endpoint)));
    let zero = std::time::Duration::ZERO;
    let Some(mut d) = driver_opts(zero, std::time::Duration::from_secs(300), Some("node-real"), stores).await else {
        return;
    };
    // The node plugin registered itself in its --store at start-up.
    let rec = d.store.get("k8s/.s3blk-nodes/node-real.json", None).await.expect("the node's record");
    let rec: serde_json::Value = serde_json::from_slice(&rec).expect("json");
    assert_eq!(rec["node_id"], "node-real");
    assert!(rec["hostname"].as_str().is_some_and(|h| !h.is_empty()) && rec["started_unix"].as_i64() > Some(0), "{rec}");
    let v = create(&mut d, "pvc-nodes", 1 << 20).await;
    let publish = |node: &str| pb::ControllerPublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: node.into(),
        volume_capability: Some(rwo()),
        secrets: secrets(),
        ..Default::default()
    };
    let e = d.ctl.controller_publish_volume(publish("node-ghost")).await.expect_err("unknown node");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(keys_under(&d, &format!("{}attachments/", prefix_of(&v.volume_id))).await.is_empty(), "no attachment");
    d.ctl.controller_publish_volume(publish("node-real")).await.expect("publish to the registered node");
    // The node records are no volumes: not listed, and never deletable as one.
    let list = d.ctl.list_volumes(pb::ListVolumesRequest::default()).await.expect("list").into_inner();
    assert_eq!(list.entries.len(), 1, "{list:?}");
    let _ = d.ctl.delete_volume(delete_req(&format!("s3://{}/k8s/.s3blk-nodes", d.bucket))).await;
    assert!(d.store.head("k8s/.s3blk-nodes/node-real.json").await.expect("head").is_some());
}

fn store_gets() -> f64 {
    let text = s3blk::metrics::render();
    text.lines()
        .find_map(|l| l.strip_prefix("s3blk_store_requests_total{op=\"GET\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_covers_every_store_provisioned_into() {
    let Some(mut d) = driver().await else { return };
    let (bucket2, _store2) = second_bucket().await;
    let home = create(&mut d, "pvc-home", 1 << 20).await;
    let mut req = create_req("pvc-away", 1 << 20, 0);
    req.parameters.insert("bucket".into(), bucket2.clone());
    req.parameters.insert("prefix".into(), "team".into());
    let away = d.ctl.create_volume(req).await.expect("create in bucket 2").into_inner().volume.expect("v");
    assert!(away.volume_id.starts_with(&format!("s3://{bucket2}/team/")), "{}", away.volume_id);
    // A registered store the controller cannot read (here: its bucket is gone) is left out.
    let gone = br#"{"url":"s3://s3blk-no-such-bucket/k8s"}"#;
    d.store.put("k8s/.s3blk-stores/gone.json", bytes::Bytes::from_static(gone), PutMode::IfAbsent).await.expect("put");
    let list = d.ctl.list_volumes(pb::ListVolumesRequest::default()).await.expect("list").into_inner();
    let mut ids: Vec<String> = list.entries.iter().map(|e| e.volume.as_ref().expect("v").volume_id.clone()).collect();
    ids.sort();
    let mut want = vec![home.volume_id.clone(), away.volume_id.clone()];
    want.sort();
    let mut failures = Vec::new();
    if ids != want {
        failures.push(format!("ListVolumes: {ids:?}, want {want:?}"));
    }
    let snap = d
        .ctl
        .create_snapshot(pb::CreateSnapshotRequest {
            source_volume_id: away.volume_id.clone(),
            name: "snap-away".into(),
            secrets: secrets(),
            ..Default::default()
        })
        .await
        .expect("snapshot")
        .into_inner()
        .snapshot
        .expect("snapshot");
    let snaps = d.ctl.list_snapshots(pb::ListSnapshotsRequest::default()).await.expect("list").into_inner();
    let sids: Vec<&str> = snaps.entries.iter().map(|e| e.snapshot.as_ref().expect("s").snapshot_id.as_str()).collect();
    if sids != vec![snap.snapshot_id.as_str()] {
        failures.push(format!("ListSnapshots: {sids:?}, want [{}]", snap.snapshot_id));
    }
    let got = d.ctl.controller_get_volume(pb::ControllerGetVolumeRequest { volume_id: away.volume_id.clone() }).await;
    let size = got.map(|g| g.into_inner().volume.map(|v| v.capacity_bytes));
    if !matches!(size, Ok(Some(s)) if s == 1 << 20) {
        failures.push(format!("ControllerGetVolume: {size:?}"));
    }
    let cap = |params: &[(&str, &str)]| pb::GetCapacityRequest {
        volume_capabilities: vec![rwo()],
        parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    let c = d.ctl.get_capacity(cap(&[("bucket", &bucket2), ("prefix", "team")])).await.expect("capacity");
    if c.into_inner().available_capacity <= 0 {
        failures.push("GetCapacity for the other bucket: none".to_string());
    }
    // A directory store other than --store is one CreateVolume refuses: no capacity there.
    let c = d.ctl.get_capacity(cap(&[("store", "file:///var/lib/elsewhere")])).await.expect("capacity");
    let c = c.into_inner().available_capacity;
    if c != 0 {
        failures.push(format!("GetCapacity for a directory store that is not --store: {c}"));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_volumes_reads_no_journal_records_but_the_newest() {
    let Some(mut d) = driver().await else { return };
    let v = create(&mut d, "pvc-long", 1 << 20).await;
    {
        let vol = Volume::open(d.store.clone(), &prefix_of(&v.volume_id), OpenOptions::default()).await.expect("open");
        // Fewer records than a writer writes between its checkpoints, so
        // that a replay reads every one of them.
        for i in 0..60u64 {
            vol.write((i % 16) * 4096, &common::pattern(i, 4096)).await.expect("write");
            vol.flush().await.expect("flush");
        }
        vol.resize(3 << 20).await.expect("resize");
        vol.flush().await.expect("flush");
    }
    let records = keys_under(&d, &format!("{}journal/", prefix_of(&v.volume_id))).await;
    assert!(records.len() >= 60, "{} records", records.len());
    assert!(keys_under(&d, &format!("{}checkpoints/", prefix_of(&v.volume_id))).await.is_empty());
    let before = store_gets();
    let list = d.ctl.list_volumes(pb::ListVolumesRequest::default()).await.expect("list").into_inner();
    let gets = store_gets() - before;
    assert_eq!(list.entries.len(), 1);
    assert_eq!(list.entries[0].volume.as_ref().expect("v").capacity_bytes, 3 << 20, "the size after the resize");
    assert!(gets <= 10.0, "ListVolumes made {gets} GETs for a volume of {} journal records", records.len());
}

/// ControllerGetVolume's condition (abnormal, message), or the call's error.
async fn condition(d: &mut Driver, id: &str) -> Result<(bool, String), (Code, String)> {
    let got = d.ctl.controller_get_volume(pb::ControllerGetVolumeRequest { volume_id: id.into() }).await;
    let got = got.map_err(|e| (e.code(), e.message().to_string()))?;
    let c = got.into_inner().status.and_then(|s| s.volume_condition).ok_or((Code::Ok, "no condition".to_string()))?;
    Ok((c.abnormal, c.message))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_volume_reports_damage_and_fenced_writers() {
    let Some(mut d) = driver().await else { return };
    let healthy = create(&mut d, "pvc-healthy", 1 << 20).await;
    write(&d, &healthy.volume_id, 0, &common::pattern(1, 8192)).await;
    let mut seen = vec![("healthy", condition(&mut d, &healthy.volume_id).await)];

    // A chunk the journal references is gone.
    let lost = create(&mut d, "pvc-lost-chunk", 1 << 20).await;
    // Half a chunk (64 KiB here): stored as a chunk object, not as inline pages.
    write(&d, &lost.volume_id, 0, &common::pattern(2, 32 << 10)).await;
    let chunks = keys_under(&d, &format!("{}chunks/", prefix_of(&lost.volume_id))).await;
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    d.store.delete(&chunks[0]).await.expect("delete chunk");
    seen.push(("chunk missing", condition(&mut d, &lost.volume_id).await));

    // A journal record that does not decode.
    let garbled = create(&mut d, "pvc-garbled", 1 << 20).await;
    write(&d, &garbled.volume_id, 0, &common::pattern(3, 8192)).await;
    let records = keys_under(&d, &format!("{}journal/", prefix_of(&garbled.volume_id))).await;
    let last = records.last().expect("a record").clone();
    d.store.put(&last, bytes::Bytes::from_static(b"not a journal record"), PutMode::Overwrite).await.expect("put");
    seen.push(("record garbled", condition(&mut d, &garbled.volume_id).await));

    // Writer 1 is taken over by writer 2, and a record of writer 1 lands after.
    let taken = create(&mut d, "pvc-taken-over", 1 << 20).await;
    let vp = prefix_of(&taken.volume_id);
    let first = Volume::open(d.store.clone(), &vp, OpenOptions::default()).await.expect("writer 1");
    first.write(0, &common::pattern(4, 4096)).await.expect("write");
    first.flush().await.expect("flush");
    drop(first);
    let second = Volume::open(d.store.clone(), &vp, OpenOptions::default()).await.expect("writer 2 takes over");
    drop(second);
    let records = keys_under(&d, &format!("{vp}journal/")).await;
    let head = s3blk::volume::format::parse_journal_key(&vp, records.last().expect("head")).expect("seq");
    let stale = s3blk::volume::format::JournalRecord {
        kind: s3blk::volume::format::RecordKind::Commit,
        seq: head + 1,
        epoch: 1,
        size: 1 << 20,
        writer: 42,
        created_unix: 0,
        chunks: Vec::new(),
        inline: Vec::new(),
    };
    let key = s3blk::volume::format::journal_key(&vp, head + 1);
    d.store.put(&key, stale.encode().into(), PutMode::IfAbsent).await.expect("stale record");
    seen.push(("taken over", condition(&mut d, &taken.volume_id).await));
    let expected = [
        ("healthy", false, "ok"),
        ("chunk missing", true, "missing"),
        ("record garbled", true, "damaged"),
        ("taken over", true, "fenced"),
    ];
    let ok = seen
        .iter()
        .zip(expected)
        .all(|((_, got), (_, abnormal, text))| got.as_ref().is_ok_and(|(a, m)| *a == abnormal && m.contains(text)));
    assert!(ok, "{seen:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_volume_reports_an_unreachable_store_as_the_volume_condition() {
    let Some(_) = common::s3_endpoint() else { return };
    // Nothing listens on this port: every store call the controller makes fails.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = dead.local_addr().expect("addr").port();
    drop(dead);
    let stores = Arc::new(Stores::with_defaults(
        common::fast_policy(),
        common::s3_settings(&format!("http://127.0.0.1:{port}")),
    ));
    let zero = std::time::Duration::ZERO;
    let Some(mut d) = driver_opts(zero, std::time::Duration::from_secs(300), None, stores).await else { return };
    let id = format!("s3://{}/k8s/pvc-somewhere", d.bucket);
    let c = condition(&mut d, &id).await;
    assert!(c.as_ref().is_ok_and(|(abnormal, m)| *abnormal && m.contains("store unreachable")), "{c:?}");
}

/// A gRPC client as Python's grpcio makes it, with default options: on a
/// unix socket it sends the percent-encoded socket path as `:authority`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_client_with_default_options_is_answered() {
    let python = common::repo_root().join(".venv/bin/python");
    let has_grpc =
        std::process::Command::new(&python).args(["-c", "import grpc"]).output().is_ok_and(|o| o.status.success());
    if !has_grpc {
        assert!(!common::in_ci(), "grpcio is required (tests/run.sh installs it into .venv)");
        eprintln!("\n*** SKIPPING: grpcio is not installed in .venv; run ./tests/run.sh ***\n");
        return;
    }
    let Some(d) = driver().await else { return };
    let script = r#"
import sys, grpc
for target in ("unix://" + sys.argv[1], "unix:" + sys.argv[1]):
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary("/csi.v1.Identity/GetPluginInfo",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
        for _ in range(3):
            reply = call(b"", timeout=10)
            assert b"csi.s3blk.dev" in reply, reply
print("ANSWERED")
"#;
    let sock = d.sock.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&python).arg("-c").arg(script).arg(&sock).output().expect("run python")
    })
    .await
    .expect("join");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("ANSWERED"), "{text}");
}

/// Ids that name a path on the controller's host rather than a volume the
/// driver could have made: NOT_FOUND (or nothing, for listings), and the
/// path is never opened, so nothing is created there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_outside_the_drivers_stores_are_not_found_and_never_opened() {
    let Some(mut d) = driver().await else { return };
    let host = tempfile::tempdir().expect("tempdir");
    let mut answers: Vec<(String, Result<(), Code>)> = Vec::new();
    for id in [format!("{}/plain/vol", host.path().display()), format!("file://{}/url/vol", host.path().display())] {
        let ok = |r: Result<(), tonic::Status>| r.map_err(|e| e.code());
        let get = d.ctl.controller_get_volume(pb::ControllerGetVolumeRequest { volume_id: id.clone() }).await;
        answers.push((format!("get {id}"), ok(get.map(|_| ()))));
        let validate = d
            .ctl
            .validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: id.clone(),
                volume_capabilities: vec![rwo()],
                ..Default::default()
            })
            .await;
        answers.push((format!("validate {id}"), ok(validate.map(|_| ()))));
        let publish = d
            .ctl
            .controller_publish_volume(pb::ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: "node-a".into(),
                volume_capability: Some(rwo()),
                ..Default::default()
            })
            .await;
        answers.push((format!("publish {id}"), ok(publish.map(|_| ()))));
        let expand = d
            .ctl
            .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: Some(pb::CapacityRange { required_bytes: 2 << 20, limit_bytes: 0 }),
                ..Default::default()
            })
            .await;
        answers.push((format!("expand {id}"), ok(expand.map(|_| ()))));
        let snap = d
            .ctl
            .create_snapshot(pb::CreateSnapshotRequest {
                source_volume_id: id.clone(),
                name: "snap-host".into(),
                ..Default::default()
            })
            .await;
        answers.push((format!("snapshot {id}"), ok(snap.map(|_| ()))));
        let list = d
            .ctl
            .list_snapshots(pb::ListSnapshotsRequest { source_volume_id: id.clone(), ..Default::default() })
            .await
            .expect("list snapshots")
            .into_inner();
        assert!(list.entries.is_empty());
        d.ctl
            .list_snapshots(pb::ListSnapshotsRequest { snapshot_id: format!("{id}@snap-host"), ..Default::default() })
            .await
            .expect("list snapshots by id");
        let mut restore = create_req("pvc-from-host", 1 << 20, 0);
        restore.volume_content_source = Some(pb::VolumeContentSource {
            r#type: Some(pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
                snapshot_id: format!("{id}@snap-host"),
            })),
        });
        answers.push((format!("restore from {id}"), ok(d.ctl.create_volume(restore).await.map(|_| ()))));
    }
    let created: Vec<_> = std::fs::read_dir(host.path()).expect("read dir").flatten().map(|e| e.path()).collect();
    let wrong: Vec<_> = answers.iter().filter(|(_, a)| *a != Err(Code::NotFound)).collect();
    assert!(created.is_empty() && wrong.is_empty(), "created on the host: {created:?}; answers: {wrong:#?}");
}

/// A second node plugin started while the first still runs with the same
/// state directory (a pod replaced before the old one exited) serves
/// nothing until the first has stopped: opening the volumes the first
/// still serves would fence it and lose its unflushed writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_plugin_waits_for_the_first_to_exit() {
    let Some(endpoint) = common::s3_endpoint() else { return };
    let stores = Arc::new(Stores::with_defaults(common::fast_policy(), common::s3_settings(&endpoint)));
    let Some(mut first) =
        driver_opts(std::time::Duration::ZERO, std::time::Duration::from_secs(300), Some("node-a"), stores).await
    else {
        return;
    };
    let mut cfg = first.cfg.clone();
    let sock = first._dir.path().join("second.sock");
    cfg.endpoint = format!("unix://{}", sock.display());
    cfg.metrics_address = None;
    let second = tokio::spawn(s3blk::csi::server::run(cfg.clone(), first.stores.clone(), std::future::pending()));
    // A third, told to stop while it waits, stops without serving.
    let (stop_third, stopped) = tokio::sync::oneshot::channel::<()>();
    let third_sock = first._dir.path().join("third.sock");
    cfg.endpoint = format!("unix://{}", third_sock.display());
    let third = tokio::spawn(s3blk::csi::server::run(cfg, first.stores.clone(), async move {
        let _ = stopped.await;
    }));
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(!sock.exists() && !second.is_finished(), "the second node plugin started beside the first");
    let _ = stop_third.send(());
    let third = tokio::time::timeout(std::time::Duration::from_secs(5), third).await;
    assert!(
        third.as_ref().is_ok_and(|r| r.as_ref().is_ok_and(|r| r.is_ok())),
        "a waiting node plugin told to stop did not: {third:?}"
    );
    assert!(!third_sock.exists(), "the stopped node plugin served");
    if let Some(stop) = first.stop.take() {
        let _ = stop.send(());
    }
    (&mut first.task).await.expect("join").expect("the first stops");
    let mut up = false;
    for _ in 0..100 {
        if sock.exists() {
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(up, "the second node plugin did not start once the first stopped");
    second.abort();
}

/// A driver with stores of its own, so that a test can put a wrapper
/// around its bucket's store once it has set things up ([`wrap_bucket`]).
async fn driver_of_its_own_stores() -> Option<Driver> {
    let endpoint = common::s3_endpoint()?;
    let stores = Arc::new(Stores::with_defaults(common::fast_policy(), common::s3_settings(&endpoint)));
    driver_opts(std::time::Duration::ZERO, std::time::Duration::from_secs(300), None, stores).await
}

/// From now on the driver reaches its bucket through `around`.
async fn wrap_bucket<A: common::Around>(d: &Driver, around: A) {
    let endpoint = common::s3_endpoint().expect("endpoint");
    let raw = s3blk::store::s3::S3Store::connect(&d.bucket, common::s3_settings(&endpoint)).await.expect("s3 client");
    let inner: DynStore = Arc::new(s3blk::store::retry::RetryStore::new(Arc::new(raw), common::fast_policy()));
    let spec = Location::parse(&format!("s3://{}/k8s", d.bucket), false).expect("store").store;
    d.stores.register(&spec, common::Wrapped::new(inner, around));
}

/// A driver whose store (for the bucket its requests name) fails as the
/// returned fault store is told to.
async fn faulty_driver() -> Option<(Driver, Arc<s3blk::store::fault::FaultStore>)> {
    let endpoint = common::s3_endpoint()?;
    let stores = Arc::new(Stores::with_defaults(common::fast_policy(), common::s3_settings(&endpoint)));
    let d = driver_opts(std::time::Duration::ZERO, std::time::Duration::from_secs(300), None, stores.clone()).await?;
    let raw = s3blk::store::s3::S3Store::connect(&d.bucket, common::s3_settings(&endpoint)).await.expect("s3 client");
    let fault = Arc::new(s3blk::store::fault::FaultStore::new(Arc::new(raw)));
    let store: DynStore = Arc::new(s3blk::store::retry::RetryStore::new(fault.clone(), common::fast_policy()));
    let spec = Location::parse(&format!("s3://{}/k8s", d.bucket), false).expect("store").store;
    stores.register(&spec, store);
    Some((d, fault))
}

fn fail_all(fault: &s3blk::store::fault::FaultStore, op: s3blk::store::fault::Op, key: &str) {
    use s3blk::store::fault::{Fault, Rule};
    fault.add_rule(Rule { op: Some(op), key_contains: Some(key.into()), fault: Fault::ServerError, times: 1_000_000 });
}

/// A CreateVolume that fails part way (its volume.json never lands) leaves
/// nothing under the name: not its provisioning record, not its probes. When
/// the store also refuses the clean-up, a DeleteVolume removes what was
/// left. Either way a retry with the same name creates the volume, and
/// another retry answers with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_create_leaves_nothing_behind() {
    use s3blk::store::fault::Op;
    let Some((mut d, fault)) = faulty_driver().await else { return };
    for (name, deletes_fail) in [("pvc-fails", false), ("pvc-fails-twice", true)] {
        fail_all(&fault, Op::Put, &format!("k8s/{name}/volume.json"));
        if deletes_fail {
            fail_all(&fault, Op::Delete, &format!("k8s/{name}/"));
        }
        let failed = d.ctl.create_volume(create_req(name, 1 << 20, 0)).await;
        assert!(failed.is_err(), "{name}: created: {failed:?}");
        fault.clear_rules();
        let prefix = format!("k8s/{name}/");
        if deletes_fail {
            let left = keys_under(&d, &prefix).await;
            assert!(left.contains(&format!("{prefix}provisioned.json")), "{left:?}");
            let del = pb::DeleteVolumeRequest { volume_id: failed_id(&d, name), secrets: secrets() };
            d.ctl.delete_volume(del).await.expect("delete");
        }
        assert_eq!(keys_under(&d, &prefix).await, Vec::<String>::new(), "{name}");
        let made = create(&mut d, name, 1 << 20).await;
        let again = create(&mut d, name, 1 << 20).await;
        assert_eq!(made.volume_id, again.volume_id);
        assert_eq!(read(&d, &made.volume_id, 0, 4096).await, vec![0; 4096]);
    }
}

/// Two CreateVolume calls cloning a volume under one name at once, in two
/// controllers (across a leader handover): the one whose pin lost the race
/// (the pin appeared between its read and its write) answers ABORTED and
/// leaves the other's pin alone. It let go of the source instead, which
/// took the pin the other's clone reads through. The CO's retry is
/// answered with the clone, which reads the source's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_create_that_loses_its_pin_to_another_leaves_that_pin() {
    let Some(mut d) = driver_of_its_own_stores().await else { return };
    let race = clone_race(&mut d, "pvc-race").await;
    let around = PinLandsAfterItsRead {
        armed: std::sync::atomic::AtomicBool::new(true),
        key: race.pin_key.clone(),
        source: race.source.clone(),
        pin: race.pin.clone(),
    };
    wrap_bucket(&d, around).await;
    let lost = d.ctl.create_volume(race.req.clone()).await;
    assert_eq!(lost.as_ref().err().map(tonic::Status::code), Some(Code::Aborted), "{lost:?}");
    race.pin_kept_and_retry_answers(&mut d).await;
}

/// A clone of a fresh volume `<name>-src` (some bytes written) asked for
/// as `<name>-clone`, and the pin its create writes in the source.
struct CloneRace {
    data: Vec<u8>,
    source: String,
    pin: String,
    pin_key: String,
    req: pb::CreateVolumeRequest,
}

async fn clone_race(d: &mut Driver, name: &str) -> CloneRace {
    let src = create(d, &format!("{name}-src"), 1 << 20).await;
    let data = common::pattern(7, 8192);
    write(d, &src.volume_id, 0, &data).await;
    let source = prefix_of(&src.volume_id);
    let clone_prefix = format!("{}{name}-clone/", source.trim_end_matches(&format!("{name}-src/")));
    let pin = s3blk::volume::format::clone_pin_name(&clone_prefix);
    let pin_key = s3blk::volume::format::snapshot_key(&source, &pin);
    let mut req = create_req(&format!("{name}-clone"), 1 << 20, 0);
    req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
            volume_id: src.volume_id.clone(),
        })),
    });
    CloneRace { data, source, pin, pin_key, req }
}

impl CloneRace {
    /// The other create's pin is still there, and the CO's retry is
    /// answered with the clone, which reads the source's bytes.
    async fn pin_kept_and_retry_answers(&self, d: &mut Driver) {
        assert!(
            d.store.head(&self.pin_key).await.expect("head").is_some(),
            "the other create's pin was taken: {:?}",
            keys_under(d, &self.source).await
        );
        let made = d.ctl.create_volume(self.req.clone()).await.expect("the retry").into_inner().volume.expect("volume");
        assert_eq!(read(d, &made.volume_id, 0, 8192).await, self.data);
    }
}

/// A snapshot name that starts with clone- (the pins' names) is refused
/// and claims nothing: taken, it could never be deleted (DeleteSnapshot
/// leaves pins alone), nor listed, and a clone of that name would read
/// through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_named_like_a_pin_is_refused() {
    let Some(mut d) = driver().await else { return };
    let v = create(&mut d, "pvc-pin-name", 1 << 20).await;
    for name in ["clone-mine", "Clone-Mine"] {
        let req = pb::CreateSnapshotRequest {
            source_volume_id: v.volume_id.clone(),
            name: name.into(),
            secrets: secrets(),
            parameters: HashMap::new(),
        };
        let r = d.ctl.create_snapshot(req).await;
        assert_eq!(r.as_ref().err().map(tonic::Status::code), Some(Code::InvalidArgument), "{name}: {r:?}");
        assert!(r.err().is_some_and(|e| e.message().contains("reserved")));
    }
    let left: Vec<String> = keys_under(&d, "k8s/").await.into_iter().filter(|k| k.contains("snapshots")).collect();
    assert!(left.is_empty(), "{left:?}");
}

/// DeleteSnapshot touches nothing outside the stores the driver provisions
/// into (an id naming another bucket is refused), and never another
/// volume's claim on a snapshot name: a DeleteSnapshot of a name that
/// volume B never took leaves volume A's snapshot of that name claimed.
/// A CreateSnapshot of a volume that does not exist claims no name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_snapshot_touches_only_its_own_objects() {
    let Some(mut d) = driver().await else { return };
    let other = common::unique("other");
    let Some(foreign) = common::s3_raw_store(&other).await else { return };
    let foreign: DynStore = foreign;
    let theirs = "k8s/data/snapshots/snap-x.json";
    foreign.put(theirs, bytes::Bytes::from_static(b"not ours"), PutMode::Overwrite).await.expect("put");
    let req = pb::DeleteSnapshotRequest { snapshot_id: format!("s3://{other}/k8s/data@snap-x"), secrets: secrets() };
    let r = d.ctl.delete_snapshot(req).await;
    assert_eq!(r.as_ref().err().map(tonic::Status::code), Some(Code::InvalidArgument), "{r:?}");
    assert!(foreign.head(theirs).await.expect("head").is_some(), "an object of another bucket was deleted");

    let a = create(&mut d, "pvc-snap-a", 1 << 20).await;
    let b = create(&mut d, "pvc-snap-b", 1 << 20).await;
    snapshot(&d, &a.volume_id, "snap-shared").await;
    let req = pb::DeleteSnapshotRequest { snapshot_id: format!("{}@snap-shared", b.volume_id), secrets: secrets() };
    d.ctl.delete_snapshot(req).await.expect("delete of a snapshot B never had");
    let again = pb::CreateSnapshotRequest {
        source_volume_id: b.volume_id.clone(),
        name: "snap-shared".into(),
        secrets: secrets(),
        parameters: HashMap::new(),
    };
    let r = d.ctl.create_snapshot(again).await;
    assert_eq!(r.as_ref().err().map(tonic::Status::code), Some(Code::AlreadyExists), "A's claim went: {r:?}");

    // A snapshot named with the CLI (capitals allowed) is deleted too.
    let prefix_b = prefix_of(&b.volume_id);
    s3blk::volume::engine::snapshot_committed(&d.store, &prefix_b, "Nightly", None, &s3blk::clock::SystemClock)
        .await
        .expect("a snapshot named with the CLI");
    let req = pb::DeleteSnapshotRequest { snapshot_id: format!("{}@Nightly", b.volume_id), secrets: secrets() };
    d.ctl.delete_snapshot(req).await.expect("delete");
    let record = s3blk::volume::format::snapshot_key(&prefix_b, "Nightly");
    assert!(d.store.head(&record).await.expect("head").is_none(), "a CLI-named snapshot was not deleted");

    let missing = format!("{}-gone", b.volume_id);
    let req = pb::CreateSnapshotRequest {
        source_volume_id: missing,
        name: "snap-of-nothing".into(),
        secrets: secrets(),
        parameters: HashMap::new(),
    };
    let r = d.ctl.create_snapshot(req).await;
    assert_eq!(r.as_ref().err().map(tonic::Status::code), Some(Code::NotFound), "{r:?}");
    let claims: Vec<String> = keys_under(&d, "k8s/_snapshots/").await;
    assert!(!claims.iter().any(|k| k.ends_with("snap-of-nothing")), "{claims:?}");
}

/// The same when the other create's pin is there before this call reads
/// it: this call takes the pin as its own (it may be its own earlier
/// attempt's), and when it then fails (here: its volume.json is refused)
/// the pin stays for the create that may still be running; a retry is
/// answered with the clone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_create_that_found_another_creates_pin_and_failed_leaves_that_pin() {
    use s3blk::store::fault::Op;
    let Some((mut d, fault)) = faulty_driver().await else { return };
    let race = clone_race(&mut d, "pvc-adopt").await;
    // The other create got as far as its pin.
    s3blk::volume::engine::snapshot_committed(&d.store, &race.source, &race.pin, None, &s3blk::clock::SystemClock)
        .await
        .expect("the other create's pin");
    fail_all(&fault, Op::Put, "pvc-adopt-clone/volume.json");
    let failed = d.ctl.create_volume(race.req.clone()).await;
    assert!(failed.is_err(), "created: {failed:?}");
    fault.clear_rules();
    race.pin_kept_and_retry_answers(&mut d).await;
}

/// A clone of a volume whose pin name (the clone's last path segment) is
/// held by the pin of a clone elsewhere (`s3blk volume clone` into another
/// folder): refused (ALREADY_EXISTS), the other pin and marker untouched.
/// It was taken as an earlier attempt's pin: the clone got the source as of
/// the other clone's making, and overwrote the other's marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_whose_pin_name_another_clone_holds_is_refused() {
    let Some(mut d) = driver().await else { return };
    let race = clone_race(&mut d, "pvc-held").await;
    let other = "elsewhere/pvc-held-clone/";
    s3blk::volume::engine::snapshot_committed(
        &d.store,
        &race.source,
        &race.pin,
        Some(other),
        &s3blk::clock::SystemClock,
    )
    .await
    .expect("the other clone's pin");
    let marker = s3blk::volume::format::clone_marker_key(&race.source, other);
    let body = bytes::Bytes::from(format!("{{\"clone\":\"{other}\",\"seq\":0}}"));
    d.store.put(&marker, body.clone(), s3blk::store::PutMode::Overwrite).await.expect("its marker");
    let refused = d.ctl.create_volume(race.req.clone()).await;
    assert_eq!(refused.as_ref().map_err(|e| e.code()).err(), Some(tonic::Code::AlreadyExists), "{refused:?}");
    let pin = s3blk::volume::engine::read_snapshot(&d.store, &race.source, &race.pin).await.expect("the pin");
    assert_eq!(pin.clone.as_deref(), Some(other));
    assert_eq!(d.store.get(&marker, None).await.expect("the marker"), body, "the other clone's marker changed");
}

/// A snapshot `<name>-snap` of a fresh volume `<name>-src` (some bytes
/// written), a restore of it asked for as `<name>-restored`, and the pin
/// another create of that name (another controller's, across a leader
/// handover) already wrote in the source, which its volume would read
/// through.
async fn restore_race(d: &mut Driver, name: &str) -> CloneRace {
    restore_of(d, name, true).await
}

/// The same, with the other create's pin in place or not.
async fn restore_of(d: &mut Driver, name: &str, other_pinned: bool) -> CloneRace {
    let src = create(d, &format!("{name}-src"), 1 << 20).await;
    let data = common::pattern(8, 8192);
    write(d, &src.volume_id, 0, &data).await;
    let snap = snapshot(d, &src.volume_id, &format!("{name}-snap")).await;
    let source = prefix_of(&src.volume_id);
    let restored = format!("{}{name}-restored/", source.trim_end_matches(&format!("{name}-src/")));
    let pin = s3blk::volume::format::clone_pin_name(&restored);
    let pin_key = s3blk::volume::format::snapshot_key(&source, &pin);
    let rec = s3blk::volume::engine::read_snapshot(&d.store, &source, &format!("{name}-snap")).await.expect("record");
    if other_pinned {
        let mut adopted = false;
        s3blk::volume::catalog::pin_snapshot_for(&d.store, &source, &rec, &restored, &restored, &mut adopted)
            .await
            .expect("the other create's pin");
        assert!(!adopted);
    }
    let mut req = create_req(&format!("{name}-restored"), 1 << 20, 0);
    req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
            snapshot_id: snap.snapshot_id,
        })),
    });
    CloneRace { data, source, pin, pin_key, req }
}

/// Two restores of one snapshot under one name at once: the one that found
/// the other's pin there and then failed (its volume.json refused) leaves
/// that pin, which the other's volume reads through; the CO's retry is
/// answered with the restored volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_found_another_creates_pin_and_failed_leaves_that_pin() {
    a_restore_whose_volume_json_is_refused_keeps_the_pin("pvc-radopt", true).await;
}

/// A restore of `<name>-snap` as `<name>-restored` (another create's pin
/// in place first, or not) whose volume.json the store refuses: it fails,
/// the pin stays, and the CO's retry is answered with the volume.
async fn a_restore_whose_volume_json_is_refused_keeps_the_pin(name: &str, other_pinned: bool) {
    use s3blk::store::fault::Op;
    let Some((mut d, fault)) = faulty_driver().await else { return };
    let race = restore_of(&mut d, name, other_pinned).await;
    fail_all(&fault, Op::Put, &format!("{name}-restored/volume.json"));
    let failed = d.ctl.create_volume(race.req.clone()).await;
    assert!(failed.is_err(), "created: {failed:?}");
    fault.clear_rules();
    race.pin_kept_and_retry_answers(&mut d).await;
}

/// A restore that wrote its pin and then failed leaves it too: another
/// restore of the name may have found it meanwhile and read through it
/// (pins of one name are alike). It let go of its source, which deleted
/// that pin. The CO's retry is answered with the volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_wrote_its_pin_and_failed_leaves_it() {
    a_restore_whose_volume_json_is_refused_keeps_the_pin("pvc-rown", false).await;
}

/// The same when the snapshot is deleted while the second restore checks
/// it: the other restore saw the snapshot after its pin landed and reads
/// through that pin, so the second one fails (NOT_FOUND) and leaves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_found_another_creates_pin_leaves_it_when_the_snapshot_goes() {
    let Some(mut d) = driver_of_its_own_stores().await else { return };
    let race = restore_race(&mut d, "pvc-rgone").await;
    let around = SnapshotGoesAfterPin {
        pin_key: race.pin_key.clone(),
        snapshot_key: s3blk::volume::format::snapshot_key(&race.source, "pvc-rgone-snap"),
    };
    wrap_bucket(&d, around).await;
    let gone = d.ctl.create_volume(race.req.clone()).await;
    assert_eq!(gone.as_ref().err().map(tonic::Status::code), Some(Code::NotFound), "{gone:?}");
    assert!(
        d.store.head(&race.pin_key).await.expect("head").is_some(),
        "the other restore's pin was taken: {:?}",
        keys_under(&d, &race.source).await
    );
}

/// A PUT of `pin_key` (refused: the pin is there) is followed by the
/// deletion of the snapshot record at `snapshot_key`.
#[derive(Debug)]
struct SnapshotGoesAfterPin {
    pin_key: String,
    snapshot_key: String,
}

#[async_trait::async_trait]
impl common::Around for SnapshotGoesAfterPin {
    async fn put(
        &self,
        inner: &DynStore,
        key: &str,
        body: bytes::Bytes,
        mode: PutMode,
    ) -> s3blk::store::StoreResult<()> {
        let r = inner.put(key, body, mode).await;
        if key == self.pin_key {
            inner.delete(&self.snapshot_key).await.expect("the user's DeleteSnapshot");
        }
        r
    }
}

/// The first GET of `key` (a clone's pin) finds it absent, and another
/// create's pin of that name lands right after.
#[derive(Debug)]
struct PinLandsAfterItsRead {
    armed: std::sync::atomic::AtomicBool,
    key: String,
    source: String,
    pin: String,
}

#[async_trait::async_trait]
impl common::Around for PinLandsAfterItsRead {
    async fn get(
        &self,
        inner: &DynStore,
        key: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> s3blk::store::StoreResult<bytes::Bytes> {
        let r = inner.get(key, range).await;
        if key == self.key && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            s3blk::volume::engine::snapshot_committed(inner, &self.source, &self.pin, None, &s3blk::clock::SystemClock)
                .await
                .expect("the other create's pin");
        }
        r
    }
}

/// A CreateVolume, plain or restoring a snapshot, whose volume.json landed
/// but whose create record did not (the store failing every try) leaves a
/// volume that cannot open; a retry of the same request finishes it rather
/// than answer with it as it is, and it then reads as asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_that_stopped_before_its_create_record_is_finished_by_a_retry() {
    use s3blk::store::fault::Op;
    let Some((mut d, fault)) = faulty_driver().await else { return };
    let src = create(&mut d, "pvc-half-src", 1 << 20).await;
    let data = common::pattern(9, 8192);
    write(&d, &src.volume_id, 0, &data).await;
    let snap = snapshot(&d, &src.volume_id, "snap-half").await;
    let restore = pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
        snapshot_id: snap.snapshot_id.clone(),
    });
    for (name, source, want) in [("pvc-half", None, vec![0u8; 8192]), ("pvc-half-restore", Some(restore), data)] {
        let mut req = create_req(name, 1 << 20, 0);
        req.volume_content_source = source.map(|t| pb::VolumeContentSource { r#type: Some(t) });
        fail_all(&fault, Op::Put, &format!("k8s/{name}/journal/"));
        let failed = d.ctl.create_volume(req.clone()).await;
        assert!(failed.is_err(), "{name}: created: {failed:?}");
        fault.clear_rules();
        let prefix = format!("k8s/{name}/");
        assert!(keys_under(&d, &prefix).await.contains(&format!("{prefix}volume.json")), "{name}");
        let opened = Volume::open(d.store.clone(), &prefix, OpenOptions::default()).await.err();
        assert!(
            opened.as_ref().is_some_and(|e| e.to_string().contains("create the same volume again")),
            "{name}: {opened:?}"
        );
        let made = d.ctl.create_volume(req).await.expect("the retry").into_inner().volume.expect("volume");
        assert_eq!(read(&d, &made.volume_id, 0, 8192).await, want, "{name}");
        let left = keys_under(&d, &prefix).await;
        assert!(!left.contains(&format!("{prefix}source.json")), "{name}: {left:?}");
    }
}

/// The id CreateVolume would have given `name` in the driver's store.
fn failed_id(d: &Driver, name: &str) -> String {
    format!("s3://{}/k8s/{name}", d.bucket)
}

/// A restore from a snapshot, or a clone of a volume, that fails part way
/// (its pin and clone marker in the source written, its volume.json not,
/// and the store refusing every clean-up) is let go of by a DeleteVolume of
/// its name: the source keeps no pin or marker for it, and deleting the
/// source (and its snapshot) then removes every object it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_restore_lets_go_of_its_source() {
    use s3blk::store::fault::Op;
    let Some((mut d, fault)) = faulty_driver().await else { return };
    let src = create(&mut d, "pvc-base", 1 << 20).await;
    write(&d, &src.volume_id, 0, &common::pattern(5, 8192)).await;
    let snap = snapshot(&d, &src.volume_id, "snap-base").await;
    let sources = [
        (
            "pvc-restore",
            pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            }),
        ),
        (
            "pvc-clone",
            pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
                volume_id: src.volume_id.clone(),
            }),
        ),
    ];
    for (name, source) in sources {
        let mut req = create_req(name, 1 << 20, 0);
        req.volume_content_source = Some(pb::VolumeContentSource { r#type: Some(source) });
        fail_all(&fault, Op::Put, &format!("k8s/{name}/volume.json"));
        fail_all(&fault, Op::Delete, "k8s/");
        let failed = d.ctl.create_volume(req.clone()).await;
        assert!(failed.is_err(), "{name}: created: {failed:?}");
        fault.clear_rules();
        let marker = format!("k8s/pvc-base/clones/{name}.json");
        assert!(d.store.head(&marker).await.expect("head").is_some(), "{name}: the clean-up was not stopped");
        // A retry with the same name creates it, reading the source.
        let made = d.ctl.create_volume(req.clone()).await.expect("retry").into_inner().volume.expect("volume");
        let again = d.ctl.create_volume(req.clone()).await.expect("again").into_inner().volume.expect("volume");
        assert_eq!(made.volume_id, again.volume_id);
        assert_eq!(read(&d, &made.volume_id, 0, 8192).await, common::pattern(5, 8192));
        d.ctl
            .delete_volume(pb::DeleteVolumeRequest { volume_id: made.volume_id.clone(), secrets: secrets() })
            .await
            .expect("delete");
        // Failed again, then deleted: the source lets go of it.
        fail_all(&fault, Op::Put, &format!("k8s/{name}/volume.json"));
        fail_all(&fault, Op::Delete, "k8s/");
        let failed = d.ctl.create_volume(req).await;
        assert!(failed.is_err(), "{name}: created: {failed:?}");
        fault.clear_rules();
        assert!(d.store.head(&marker).await.expect("head").is_some(), "{name}: the clean-up was not stopped");
        let del = pb::DeleteVolumeRequest { volume_id: failed_id(&d, name), secrets: secrets() };
        d.ctl.delete_volume(del).await.expect("delete");
        assert_eq!(keys_under(&d, &format!("k8s/{name}/")).await, Vec::<String>::new(), "{name}");
        let pins: Vec<String> = keys_under(&d, "k8s/pvc-base/")
            .await
            .into_iter()
            .filter(|k| k.contains("clone-") || k.contains("/clones/"))
            .collect();
        assert!(pins.is_empty(), "{name}: the source still holds {pins:?}");
    }
    // The source and its snapshot go, and with them every object.
    let del = pb::DeleteSnapshotRequest { snapshot_id: snap.snapshot_id.clone(), secrets: secrets() };
    d.ctl.delete_snapshot(del).await.expect("delete snapshot");
    let del = pb::DeleteVolumeRequest { volume_id: src.volume_id.clone(), secrets: secrets() };
    d.ctl.delete_volume(del).await.expect("delete source");
    assert_eq!(keys_under(&d, "k8s/pvc-base/").await, Vec::<String>::new());
}

/// Holds every PUT of a key ending in `suffix` for `delay` before sending
/// it; `held` is set once one is held.
#[derive(Debug)]
struct SlowPut {
    suffix: &'static str,
    delay: std::time::Duration,
    held: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait::async_trait]
impl common::Around for SlowPut {
    async fn put(
        &self,
        inner: &DynStore,
        key: &str,
        body: bytes::Bytes,
        mode: PutMode,
    ) -> s3blk::store::StoreResult<()> {
        if key.ends_with(self.suffix) {
            self.held.store(true, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
        }
        inner.put(key, body, mode).await
    }
}

/// Give up on `call` (drop it, as a sidecar's deadline does) once `held`
/// says its PUT is held; it must not have answered by then.
async fn give_up_once_held<T: std::fmt::Debug>(held: &std::sync::atomic::AtomicBool, call: tokio::task::JoinHandle<T>) {
    for _ in 0..200 {
        if held.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(held.load(std::sync::atomic::Ordering::SeqCst), "the create never reached its volume.json");
    call.abort();
    assert!(call.await.is_err(), "the create answered before it was given up on; the test proves nothing");
}

/// A CreateVolume its caller gives up on (the provisioner's deadline; here
/// the call dropped) still finishes: its retry answers ABORTED while it
/// runs, the volume appears without another call, and the next retry is
/// answered with it. Dropped, the call stopped wherever it was, its store
/// requests cut off (or, sent already, landing later beside the retry's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_volume_its_caller_gives_up_on_still_finishes() {
    let Some(d) = driver_of_its_own_stores().await else { return };
    let held = Arc::new(std::sync::atomic::AtomicBool::new(false));
    wrap_bucket(&d, SlowPut { suffix: "/volume.json", delay: std::time::Duration::from_secs(2), held: held.clone() })
        .await;
    let req = create_req("pvc-given-up", 1 << 20, 0);
    let mut ctl = d.ctl.clone();
    let first = req.clone();
    let call = tokio::spawn(async move { ctl.create_volume(first).await });
    // Given up on while its volume.json is on its way.
    give_up_once_held(&held, call).await;
    let retry = d.ctl.clone().create_volume(req.clone()).await;
    assert_eq!(retry.as_ref().map_err(|s| s.code()).err(), Some(Code::Aborted), "a retry ran beside it: {retry:?}");
    let mut made = false;
    for _ in 0..100 {
        let listed = s3blk::store::list_all(d.store.as_ref(), "k8s/").await.expect("list");
        if listed.iter().any(|o| o.key.contains("pvc-given-up") && o.key.ends_with("/volume.json")) {
            made = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(made, "the create given up on did not finish");
    // Its volume.json is there; its last steps may still run (ABORTED).
    let mut next = d.ctl.clone().create_volume(req.clone()).await;
    for _ in 0..100 {
        if !matches!(&next, Err(s) if s.code() == Code::Aborted) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        next = d.ctl.clone().create_volume(req.clone()).await;
    }
    let v = next.expect("the next retry").into_inner().volume.expect("volume");
    assert_eq!(v.capacity_bytes, 1 << 20);
}

/// A controller told to stop waits for a CreateVolume its caller gave up
/// on before it returns: the create's store requests run to their end
/// (here its volume.json lands) instead of stopping wherever the process
/// ends. Before, it returned at once with the call still under way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_told_to_stop_first_finishes_a_create_its_caller_gave_up_on() {
    let Some(mut d) = driver_of_its_own_stores().await else { return };
    let held = Arc::new(std::sync::atomic::AtomicBool::new(false));
    wrap_bucket(&d, SlowPut { suffix: "/volume.json", delay: std::time::Duration::from_secs(3), held: held.clone() })
        .await;
    let mut ctl = d.ctl.clone();
    let call = tokio::spawn(async move { ctl.create_volume(create_req("pvc-stopping", 1 << 20, 0)).await });
    give_up_once_held(&held, call).await;
    if let Some(stop) = d.stop.take() {
        let _ = stop.send(());
    }
    (&mut d.task).await.expect("join").expect("the controller stops");
    let listed = s3blk::store::list_all(d.store.as_ref(), "k8s/").await.expect("list");
    assert!(
        listed.iter().any(|o| o.key.contains("pvc-stopping") && o.key.ends_with("/volume.json")),
        "the controller stopped before the create it was running finished: {listed:?}"
    );
}

const KEY_A: &str = "3131313131313131313131313131313131313131313131313131313131313131";
const KEY_B: &str = "MjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjI=";

/// The provisioner secret with an encryption key.
fn secrets_with_key(key: &str) -> HashMap<String, String> {
    let mut s = secrets();
    s.insert("encryptionKey".into(), key.into());
    s
}

/// An encrypted StorageClass: `encrypted: "true"` and a secret holding
/// `encryptionKey`. CreateVolume makes a format-6 volume wrapped by that
/// key (and is idempotent); a class that says encrypted without a key, a
/// secret with a key the class says nothing about, and a bad key are
/// refused; snapshots, restores and clones need the key and are encrypted
/// with the same data key; a restore into an unencrypted class is refused;
/// expand needs the key; no object holds the plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_storage_classes_provision_encrypted_volumes() {
    let Some(mut d) = driver().await else { return };
    let enc_req = |name: &str, key: Option<&str>, encrypted: Option<&str>| {
        let mut r = create_req(name, 1 << 20, 0);
        if let Some(e) = encrypted {
            r.parameters.insert("encrypted".into(), e.into());
        }
        if let Some(k) = key {
            r.secrets = secrets_with_key(k);
        }
        r
    };
    let refused = |r: Result<tonic::Response<pb::CreateVolumeResponse>, tonic::Status>, needle: &str| match r {
        Err(s) => assert!(s.code() == Code::InvalidArgument && s.message().contains(needle), "{s:?}"),
        Ok(v) => panic!("expected a refusal, got {v:?}"),
    };
    refused(d.ctl.create_volume(enc_req("pvc-e0", None, Some("true"))).await, "holds no encryptionKey");
    refused(d.ctl.create_volume(enc_req("pvc-e0", Some(KEY_A), None)).await, "set the parameter encrypted");
    refused(d.ctl.create_volume(enc_req("pvc-e0", Some("short"), Some("true"))).await, "32 bytes");
    refused(d.ctl.create_volume(enc_req("pvc-e0", Some(KEY_A), Some("maybe"))).await, "true or false");
    let vol = d.ctl.create_volume(enc_req("pvc-enc", Some(KEY_A), Some("true"))).await.expect("create").into_inner();
    let vol = vol.volume.expect("volume");
    assert_eq!(vol.volume_context.get("encrypted").map(String::as_str), Some("true"), "the node checks it");
    let again = d.ctl.create_volume(enc_req("pvc-enc", Some(KEY_A), Some("true"))).await.expect("idempotent");
    assert_eq!(again.into_inner().volume.expect("volume").volume_id, vol.volume_id);
    let plain_again = d.ctl.create_volume(enc_req("pvc-enc", Some(KEY_A), Some("false"))).await;
    assert_eq!(code(plain_again), Code::AlreadyExists);
    // An unencrypted class without a key asking for the name: the same answer.
    assert_eq!(code(d.ctl.create_volume(enc_req("pvc-enc", None, None)).await), Code::AlreadyExists);

    let prefix = prefix_of(&vol.volume_id);
    let key_a = s3blk::crypto::Kek::parse(KEY_A.as_bytes()).expect("key");
    let meta = s3blk::volume::replay::read_meta(d.store.as_ref(), &prefix).await.expect("meta");
    assert_eq!(meta.encryption.as_ref().map(|e| e.key_id.clone()), Some(key_a.id()));
    assert!(matches!(
        Volume::open(d.store.clone(), &prefix, OpenOptions::default()).await,
        Err(s3blk::volume::VolumeError::Key(_))
    ));
    let sealed = s3blk::volume::keys::unlock(&d.store, &prefix, Some(&key_a)).await.expect("unlock");
    let data: Vec<u8> = b"ENCRYPTED-CSI-PLAINTEXT;".iter().cycle().take(300_000).copied().collect();
    let v = Volume::open(sealed.clone(), &prefix, OpenOptions::default()).await.expect("open");
    v.write(4096, &data).await.expect("write");
    v.flush().await.expect("flush");
    drop(v);

    // Snapshot: without the key it cannot read the volume's head.
    let snap_req = |key: Option<&str>| pb::CreateSnapshotRequest {
        source_volume_id: vol.volume_id.clone(),
        name: "snap-enc".into(),
        secrets: key.map(secrets_with_key).unwrap_or_else(secrets),
        parameters: HashMap::new(),
    };
    assert_eq!(code(d.ctl.create_snapshot(snap_req(None)).await), Code::InvalidArgument);
    let snap = d.ctl.create_snapshot(snap_req(Some(KEY_A))).await.expect("snapshot").into_inner();
    let snap_id = snap.snapshot.expect("snapshot").snapshot_id;
    let from = |name: &str, key: &str, encrypted: &str, source: pb::volume_content_source::Type| {
        let mut r = enc_req(name, Some(key), Some(encrypted));
        r.volume_content_source = Some(pb::VolumeContentSource { r#type: Some(source) });
        r
    };
    let of_snap = || {
        pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
            snapshot_id: snap_id.clone(),
        })
    };
    let of_vol = || {
        pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
            volume_id: vol.volume_id.clone(),
        })
    };
    refused(d.ctl.create_volume(from("pvc-r0", KEY_B, "true", of_snap())).await, "wrong key for volume");
    refused(d.ctl.create_volume(from("pvc-r0", KEY_A, "false", of_snap())).await, "must be encrypted too");
    // Refused before anything was written into the source (no pin, no marker).
    let pins = s3blk::store::list_all(d.store.as_ref(), &format::snapshot_prefix(&prefix)).await.expect("list");
    assert!(pins.iter().all(|o| !o.key.contains("clone-")), "{pins:?}");
    let markers = s3blk::store::list_all(d.store.as_ref(), &format::clones_prefix(&prefix)).await.expect("list");
    assert!(markers.is_empty(), "{markers:?}");
    refused(d.ctl.create_volume(from("pvc-c0", KEY_B, "true", of_vol())).await, "wrong key for volume");
    let restored = d.ctl.create_volume(from("pvc-r1", KEY_A, "true", of_snap())).await.expect("restore").into_inner();
    let cloned = d.ctl.create_volume(from("pvc-c1", KEY_A, "true", of_vol())).await.expect("clone").into_inner();
    for made in [restored.volume.expect("volume"), cloned.volume.expect("volume")] {
        let p = prefix_of(&made.volume_id);
        let m = s3blk::volume::replay::read_meta(d.store.as_ref(), &p).await.expect("meta");
        assert_eq!(m.encryption.map(|e| e.data_key_id), meta.encryption.as_ref().map(|e| e.data_key_id.clone()));
        let s = s3blk::volume::keys::unlock(&d.store, &p, Some(&key_a)).await.expect("unlock");
        let r = Volume::open(s, &p, OpenOptions { read_only: true, ..OpenOptions::default() }).await.expect("open");
        assert!(r.read(4096, data.len() as u64).await.expect("read") == data, "{p} reads its source's bytes");
    }

    // Expand: the key is needed to write the new size.
    let expand = |key: Option<&str>| pb::ControllerExpandVolumeRequest {
        volume_id: vol.volume_id.clone(),
        capacity_range: Some(pb::CapacityRange { required_bytes: 2 << 20, limit_bytes: 0 }),
        secrets: key.map(secrets_with_key).unwrap_or_else(secrets),
        volume_capability: Some(rwo()),
    };
    assert_eq!(code(d.ctl.controller_expand_volume(expand(None)).await), Code::InvalidArgument);
    let grown = d.ctl.controller_expand_volume(expand(Some(KEY_A))).await.expect("expand").into_inner();
    assert_eq!(grown.capacity_bytes, 2 << 20);

    for o in s3blk::store::list_all(d.store.as_ref(), "").await.expect("list") {
        let b = d.store.get(&o.key, None).await.expect("get");
        assert!(!b.windows(18).any(|w| w == b"ENCRYPTED-CSI-PLAI"), "plaintext in {}", o.key);
    }
    // Calls without secrets still answer for encrypted volumes: listing
    // (at their size at creation) and their condition (not checked).
    let listed = d.ctl.list_volumes(pb::ListVolumesRequest::default()).await.expect("list").into_inner();
    assert!(listed.entries.iter().any(|e| e.volume.as_ref().is_some_and(|v| v.volume_id == vol.volume_id)));
    let got = d
        .ctl
        .controller_get_volume(pb::ControllerGetVolumeRequest { volume_id: vol.volume_id.clone() })
        .await
        .expect("get volume")
        .into_inner();
    let condition = got.status.and_then(|s| s.volume_condition).expect("a condition");
    assert!(!condition.abnormal && condition.message.contains("encrypted"), "{condition:?}");
}
