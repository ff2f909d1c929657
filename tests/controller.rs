//! The Kubernetes controller: the compaction reconcile loop over
//! PersistentVolumes, its Events and annotations, the orphan pass and the
//! Lease.
//!
//! There is NO Kubernetes API server on the machines these tests run on.
//! The API is scripted: kube's `Client` talks to one end of a
//! `tower_test::mock::pair`, and the test plays the API server on the other
//! end, checking each request (method, path, body) and answering as an API
//! server would (kube-rs's own mock-service pattern). For the Lease, the
//! scripted server keeps one Lease object and honours `resourceVersion`
//! like the real one (a stale replace or a second create gets 409).
//!
//! The compaction itself is real: volumes live in a local directory store
//! or on the moto S3 server, and the tests count the objects compaction
//! really deleted.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::time::Instant;

use s3blk::clock::{Clock, ManualClock, SystemClock};
use s3blk::controller::lease::{LeaseLock, LeaseTiming, Round};
use s3blk::controller::reconcile::{
    self, ANN_FAILURES, ANN_LAST, ANN_RESULT, Context, Credentials, Outcome, Schedule, credentials_for,
};
use s3blk::controller::{elect_and_run, orphans};
use s3blk::csi::common::Stores;
use s3blk::location::Location;
use s3blk::store::{self, DynStore};
use s3blk::volume::compact::{CompactOptions, CompactReport};
use s3blk::volume::engine::CreateOptions;
use s3blk::volume::{OpenOptions, Volume, format};

const DRIVER: &str = "csi.s3blk.dev";
const CS: u32 = 64 << 10;
const INTERVAL: Duration = Duration::from_secs(3600);
const BACKOFF: Duration = Duration::from_secs(30);

// ------------------------------------------------------------ scripted API

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Reply = tower_test::mock::SendResponse<Response<Body>>;

fn mock_client() -> (Client, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "s3blk"), ApiServer(handle))
}

struct ApiServer(Handle);

impl ApiServer {
    /// The next request: it must be `method path`. Returns its JSON body.
    async fn expect(&mut self, method: &str, path: &str) -> (Value, Reply) {
        let (req, reply) = tokio::time::timeout(Duration::from_secs(60), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"))
            .expect("the client is gone");
        assert_eq!((req.method().as_str(), req.uri().path()), (method, path), "unexpected request");
        (body_json(req).await, reply)
    }

    /// Answer the PV patches and Events of a reconcile until it is done;
    /// the Events it posted.
    async fn answer_until_done(
        &mut self,
        task: tokio::task::JoinHandle<Result<Action, reconcile::ReconcileError>>,
    ) -> Vec<Value> {
        let mut events = Vec::new();
        tokio::pin!(task);
        loop {
            tokio::select! {
                biased;
                done = &mut task => {
                    done.expect("task").expect("reconcile");
                    return events;
                }
                next = self.0.next_request() => {
                    // The reconcile ended, and its client with it.
                    let Some((req, reply)) = next else {
                        (&mut task).await.expect("task").expect("reconcile");
                        return events;
                    };
                    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
                    let body = body_json(req).await;
                    match (method.as_str(), path.as_str()) {
                        ("PATCH", p) if p.starts_with("/api/v1/persistentvolumes/") => respond(reply, 200, &json!({})),
                        ("POST", "/apis/events.k8s.io/v1/namespaces/default/events") => {
                            respond(reply, 201, &body);
                            events.push(body);
                        }
                        other => panic!("unexpected request {other:?}"),
                    }
                }
            }
        }
    }

    /// No request arrives within a short while.
    async fn expect_silence(&mut self) {
        if let Ok(Some((req, _))) = tokio::time::timeout(Duration::from_millis(300), self.0.next_request()).await {
            panic!("unexpected request {} {}", req.method(), req.uri().path());
        }
    }
}

async fn body_json(req: Request<Body>) -> Value {
    let bytes = req.into_body().collect_bytes().await.expect("request body");
    if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("a JSON body") }
}

fn respond(reply: Reply, code: u16, body: &Value) {
    let resp =
        Response::builder().status(code).body(Body::from(serde_json::to_vec(body).expect("json"))).expect("response");
    reply.send_response(resp);
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": reason, "reason": reason, "code": code})
}

// ------------------------------------------------------------ fixtures

fn pv(name: &str, driver: &str, handle: &str, annotations: Value, csi_extra: Value) -> PersistentVolume {
    let mut csi = json!({"driver": driver, "volumeHandle": handle});
    if let (Some(c), Some(extra)) = (csi.as_object_mut(), csi_extra.as_object()) {
        c.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "7", "annotations": annotations},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "csi": csi},
    }))
    .expect("a PV")
}

fn context(
    client: Client,
    stores: Arc<Stores>,
    default_store: Option<Location>,
    clock: Arc<dyn Clock>,
) -> Arc<Context> {
    let reporter = Reporter { controller: "s3blk-compaction".into(), instance: Some("test-replica".into()) };
    Arc::new(Context {
        client: client.clone(),
        driver_name: DRIVER.into(),
        stores,
        default_store,
        schedule: Schedule { interval: INTERVAL, first_backoff: BACKOFF },
        compact: CompactOptions { safety_age: Duration::ZERO, ..CompactOptions::default() },
        recorder: Recorder::new(client, reporter),
        clock,
        unrecorded: Default::default(),
    })
}

fn now() -> i64 {
    SystemClock.now_unix()
}

/// A volume whose chunk 0 was written `rewrites` times, each flushed: all
/// but the last generation are garbage once folded.
async fn volume_with_garbage(store: &DynStore, vol: &str, rewrites: u8) {
    let opts = CreateOptions::new(4 * CS as u64, CS);
    Volume::create(store.clone(), vol, opts, &SystemClock).await.expect("create");
    let v = Volume::open(store.clone(), vol, OpenOptions::default()).await.expect("open");
    for i in 0..rewrites {
        v.write(0, &vec![i + 1; CS as usize]).await.expect("write");
        v.flush().await.expect("flush");
    }
}

async fn chunk_objects(store: &DynStore, vol: &str) -> usize {
    store::list_all(store.as_ref(), &format::chunk_prefix(vol)).await.expect("list").len()
}

fn annotation<'a>(patch: &'a Value, key: &str) -> &'a Value {
    &patch["metadata"]["annotations"][key]
}

// ------------------------------------------------------------ which PVs, which credentials

#[tokio::test]
async fn pvs_of_other_drivers_and_pvs_being_deleted_are_left_alone() {
    let (client, mut api) = mock_client();
    let ctx = context(client, Arc::new(Stores::default()), None, Arc::new(SystemClock));
    let other = pv("pv-other", "ebs.csi.aws.com", "vol-0123", json!({}), json!({}));
    assert_eq!(reconcile::reconcile(Arc::new(other), ctx.clone()).await.expect("reconcile"), Action::await_change());
    let mut nfs: PersistentVolume = pv("pv-nfs", DRIVER, "x", json!({}), json!({}));
    nfs.spec.as_mut().expect("spec").csi = None;
    assert_eq!(reconcile::reconcile(Arc::new(nfs), ctx.clone()).await.expect("reconcile"), Action::await_change());
    let mut going = pv("pv-going", DRIVER, "s3://b/k8s/pvc-1", json!({}), json!({}));
    going.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()));
    assert_eq!(reconcile::reconcile(Arc::new(going), ctx).await.expect("reconcile"), Action::await_change());
    api.expect_silence().await;
}

#[test]
fn credentials_prefer_the_controller_publish_secret_then_the_provisioner_secret() {
    let publish = json!({"controllerPublishSecretRef": {"name": "pub", "namespace": "ns1"},
                         "controllerExpandSecretRef": {"name": "exp", "namespace": "ns3"}});
    let provisioner = json!({"volume.kubernetes.io/provisioner-deletion-secret-name": "prov",
                             "volume.kubernetes.io/provisioner-deletion-secret-namespace": "ns2"});
    let secret = |namespace: &str, name: &str, source| Credentials::Secret {
        namespace: namespace.into(),
        name: name.into(),
        source,
    };
    let p = pv("a", DRIVER, "s3://b/v", provisioner.clone(), publish.clone());
    assert_eq!(credentials_for(&p), secret("ns1", "pub", "controllerPublishSecretRef"));
    let p = pv(
        "a",
        DRIVER,
        "s3://b/v",
        provisioner,
        json!({"controllerExpandSecretRef": {"name": "exp", "namespace": "ns3"}}),
    );
    assert_eq!(credentials_for(&p), secret("ns2", "prov", "provisioner secret (StorageClass)"));
    let p = pv(
        "a",
        DRIVER,
        "s3://b/v",
        json!({}),
        json!({"controllerExpandSecretRef": {"name": "exp", "namespace": "ns3"}}),
    );
    assert_eq!(credentials_for(&p), secret("ns3", "exp", "controllerExpandSecretRef"));
    let p =
        pv("a", DRIVER, "s3://b/v", json!({}), json!({"controllerPublishSecretRef": {"name": "", "namespace": "x"}}));
    assert_eq!(credentials_for(&p), Credentials::PodEnvironment, "an empty name names no secret");
}

// ------------------------------------------------------------ compaction, annotations, Events

/// The whole decision on a local directory store: the compaction really
/// deletes the garbage, the annotations and the Event say what it did, and
/// the next reconcile is an interval later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_volume_is_compacted_annotated_and_gets_an_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::local_store(dir.path());
    volume_with_garbage(&store, "pvc-1/", 4).await;
    assert_eq!(chunk_objects(&store, "pvc-1/").await, 4);
    let root = Location::parse(&format!("file://{}", dir.path().display()), false).expect("root");
    let handle = root.child("pvc-1").url();
    let clock = Arc::new(ManualClock::new(now()));
    let (client, mut api) = mock_client();
    let ctx = context(client, Arc::new(Stores::new(common::fast_policy())), Some(root), clock.clone());
    let task =
        tokio::spawn(reconcile::reconcile(Arc::new(pv("pv-1", DRIVER, &handle, json!({}), json!({}))), ctx.clone()));

    let (patch, reply) = api.expect("PATCH", "/api/v1/persistentvolumes/pv-1").await;
    assert_eq!(chunk_objects(&store, "pvc-1/").await, 1, "three superseded generations are gone");
    let result = annotation(&patch, ANN_RESULT).as_str().expect("a result");
    // Three 64 KiB chunks, each with its table (a crc32c per 16 KiB).
    assert!(result.starts_with("ok: deleted 3 chunk objects (192.05 KiB)"), "{result}");
    let when: Timestamp = annotation(&patch, ANN_LAST).as_str().expect("a time").parse().expect("RFC 3339");
    assert_eq!(when.as_second(), clock.now_unix());
    assert_eq!(annotation(&patch, ANN_FAILURES), &Value::Null, "a success clears the failure count");
    respond(reply, 200, &serde_json::to_value(pv("pv-1", DRIVER, &handle, json!({}), json!({}))).expect("pv"));

    let (event, reply) = api.expect("POST", "/apis/events.k8s.io/v1/namespaces/default/events").await;
    assert_eq!(event["type"], "Normal");
    assert_eq!(event["reason"], "Compacted");
    assert_eq!(event["regarding"]["kind"], "PersistentVolume");
    assert_eq!(event["regarding"]["name"], "pv-1");
    assert_eq!(event["reportingController"], "s3blk-compaction");
    let note = event["note"].as_str().expect("a note");
    assert!(note.starts_with("deleted 3 chunk objects (192.05 KiB)") && note.contains("checkpoint at seq"), "{note}");
    respond(reply, 201, &event);
    assert_eq!(task.await.expect("task").expect("reconcile"), Action::requeue(INTERVAL));
    let metrics = s3blk::metrics::render();
    // Per volume, labelled with its prefix in the store.
    assert!(
        metrics.contains("\ns3blk_volume_compactions_total{volume=\"pvc-1\",outcome=\"changed\"} 1\n"),
        "{metrics}"
    );
    let freed = format!(
        "\ns3blk_compaction_freed_bytes_total{{volume=\"pvc-1\"}} {}\n",
        3 * (65536 + format::table_len(65536))
    );
    assert!(metrics.contains(&freed), "{metrics}");

    // The watch event our patch causes: not due, only requeued; nothing touched.
    clock.advance(600);
    let annotated = pv("pv-1", DRIVER, &handle, json!({ANN_LAST: when.to_string(), ANN_RESULT: result}), json!({}));
    let again = tokio::time::timeout(Duration::from_secs(20), reconcile::reconcile(Arc::new(annotated), ctx.clone()))
        .await
        .expect("not due: answered without waiting for the API")
        .expect("reconcile");
    assert_eq!(again, Action::requeue(INTERVAL - Duration::from_secs(600)));
    api.expect_silence().await;

    // Due again with nothing to delete: annotated, but no Event.
    clock.advance(3000);
    let annotated = pv("pv-1", DRIVER, &handle, json!({ANN_LAST: when.to_string(), ANN_RESULT: result}), json!({}));
    let task = tokio::spawn(reconcile::reconcile(Arc::new(annotated.clone()), ctx));
    let (patch, reply) = api.expect("PATCH", "/api/v1/persistentvolumes/pv-1").await;
    let result = annotation(&patch, ANN_RESULT).as_str().expect("a result");
    assert!(result.starts_with("ok: nothing to delete"), "{result}");
    respond(reply, 200, &serde_json::to_value(annotated).expect("pv"));
    assert_eq!(task.await.expect("task").expect("reconcile"), Action::requeue(INTERVAL));
    api.expect_silence().await;
    assert_eq!(chunk_objects(&store, "pvc-1/").await, 1);
}

/// A clone of a class with `flatten: "true"` that no node serves is
/// flattened by the reconcile after its compaction (a Flattened Event);
/// the same clone while a node is recorded as using it is left to that
/// node; a PV without the parameter is not flattened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconcile_flattens_a_clone_no_node_serves() {
    use s3blk::volume::catalog;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::local_store(dir.path());
    volume_with_garbage(&store, "src/", 2).await;
    for c in ["pvc-1/", "pvc-2/"] {
        catalog::clone_volume(&store, "src/", None, c, c, None, &SystemClock).await.expect("clone");
    }
    let root = Location::parse(&format!("file://{}", dir.path().display()), false).expect("root");
    let clock = Arc::new(ManualClock::new(now()));
    let (client, mut api) = mock_client();
    let ctx = context(client, Arc::new(Stores::new(common::fast_policy())), Some(root.clone()), clock);
    let flatten = json!({"volumeAttributes": {"flatten": "true"}});
    let meta = |vol: &'static str| {
        let store = store.clone();
        async move { s3blk::volume::replay::read_meta(store.as_ref(), vol).await.expect("meta") }
    };
    let reconcile_one = |name: &'static str, vol: &str, csi: Value| {
        let pv = pv(name, DRIVER, &root.child(vol).url(), json!({}), csi);
        tokio::spawn(reconcile::reconcile(Arc::new(pv), ctx.clone()))
    };

    // Not asked: compacted, not flattened.
    let events = api.answer_until_done(reconcile_one("pv-2", "pvc-2", json!({}))).await;
    assert!(events.iter().all(|e| e["action"] == "Compact"), "{events:?}");
    assert!(meta("pvc-2/").await.parent.is_some(), "flattened without being asked");

    // Asked, but a node uses it (its attachment record): left to the node.
    let a = catalog::Attachment { node_id: "node-a".into(), readonly: false, created_unix: now() };
    catalog::attach(&store, "pvc-1/", &a).await.expect("attach");
    let events = api.answer_until_done(reconcile_one("pv-1", "pvc-1", flatten.clone())).await;
    assert!(events.iter().all(|e| e["action"] == "Compact"), "{events:?}");
    assert!(meta("pvc-1/").await.parent.is_some(), "flattened under a node that serves it");

    // Asked, and no node uses it: flattened, and the parent can go.
    catalog::detach(&store, "pvc-1/", "node-a").await.expect("detach");
    let events = api.answer_until_done(reconcile_one("pv-1", "pvc-1", flatten)).await;
    let flat: Vec<&Value> = events.iter().filter(|e| e["action"] == "Flatten").collect();
    assert_eq!(flat.len(), 1, "{events:?}");
    assert_eq!((flat[0]["type"].as_str(), flat[0]["reason"].as_str()), (Some("Normal"), Some("Flattened")));
    assert!(flat[0]["note"].as_str().is_some_and(|n| n.contains("no longer reads through")), "{events:?}");
    let m = meta("pvc-1/").await;
    assert!(m.parent.is_none() && m.flattened.is_some(), "{m:?}");
    assert!(store.head(&format::clone_marker_key("src/", "pvc-1/")).await.expect("head").is_none());
    assert!(store.head("pvc-1/lease.json").await.expect("head").is_none(), "the lease was not released");
    let ro = OpenOptions { read_only: true, ..OpenOptions::default() };
    let v = Volume::open(store.clone(), "pvc-1/", ro).await.expect("open");
    assert_eq!(v.read(0, CS as u64).await.expect("read"), vec![2u8; CS as usize]);
}

/// A ControllerPublish that writes its attachment just after the
/// controller's flatten wrote its lease (it then sees that lease and is
/// refused): the flatten, listing attachments after its lease, opens no
/// writer beside the node's, and lets the lease go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flatten_never_opens_a_writer_once_a_publish_wrote_its_attachment() {
    use s3blk::volume::catalog;
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = common::local_store(dir.path());
    volume_with_garbage(&plain, "src/", 1).await;
    catalog::clone_volume(&plain, "src/", None, "pvc-1/", "pvc-1/", None, &SystemClock).await.expect("clone");
    let head = || async {
        s3blk::volume::replay::replay(plain.as_ref(), "pvc-1/", CS as u64, None).await.expect("replay").head
    };
    let before = head().await;
    let root = Location::parse(&format!("file://{}", dir.path().display()), false).expect("root");
    let stores = Arc::new(Stores::new(common::fast_policy()));
    stores.register(&root.store, common::Wrapped::new(plain.clone(), AttachAfterLease));
    let (client, mut api) = mock_client();
    let ctx = context(client, stores, Some(root.clone()), Arc::new(ManualClock::new(now())));
    let csi = json!({"volumeAttributes": {"flatten": "true"}});
    let pv = pv("pv-1", DRIVER, &root.child("pvc-1").url(), json!({}), csi);
    let events = api.answer_until_done(tokio::spawn(reconcile::reconcile(Arc::new(pv), ctx))).await;
    assert!(events.iter().all(|e| e["action"] == "Compact"), "{events:?}");
    assert_eq!(head().await, before, "the flatten opened a writer (its open record) beside the attached node's");
    let m = s3blk::volume::replay::read_meta(plain.as_ref(), "pvc-1/").await.expect("meta");
    assert!(m.parent.is_some() && m.flattened.is_none(), "{m:?}");
    assert!(plain.head("pvc-1/lease.json").await.expect("head").is_none(), "the lease was not let go");
}

/// Writes an attachment of node-a right after a volume's lease is written.
#[derive(Debug)]
struct AttachAfterLease;

#[async_trait::async_trait]
impl common::Around for AttachAfterLease {
    async fn put(
        &self,
        inner: &DynStore,
        key: &str,
        body: bytes::Bytes,
        mode: store::PutMode,
    ) -> store::StoreResult<()> {
        inner.put(key, body, mode).await?;
        if let Some(vol) = key.strip_suffix("lease.json") {
            let a =
                s3blk::volume::catalog::Attachment { node_id: "node-a".into(), readonly: false, created_unix: now() };
            s3blk::volume::catalog::attach(inner, vol, &a).await.expect("attach");
        }
        Ok(())
    }
}

/// A missing secret is a failure: a Warning Event, the failure count on the
/// PV, and a retry after the backoff, which doubles per failure in a row.
#[tokio::test]
async fn a_missing_secret_is_a_warning_event_and_a_retry_with_backoff() {
    let (client, mut api) = mock_client();
    let ctx = context(client, Arc::new(Stores::default()), None, Arc::new(ManualClock::new(now())));
    let secret = json!({"controllerPublishSecretRef": {"name": "creds", "namespace": "storage"}});
    let stale = Timestamp::from_second(now() - 7200).expect("time").to_string();
    let pv1 = pv("pv-2", DRIVER, "s3://bucket/k8s/pvc-2", json!({ANN_LAST: stale, ANN_FAILURES: "2"}), secret);
    let task = tokio::spawn(reconcile::reconcile(Arc::new(pv1.clone()), ctx));

    let (_, reply) = api.expect("GET", "/api/v1/namespaces/storage/secrets/creds").await;
    respond(reply, 404, &status(404, "NotFound"));
    let (patch, reply) = api.expect("PATCH", "/api/v1/persistentvolumes/pv-2").await;
    assert_eq!(annotation(&patch, ANN_FAILURES), "3");
    let result = annotation(&patch, ANN_RESULT).as_str().expect("a result");
    assert!(result.starts_with("failed (SecretNotFound): secret storage/creds"), "{result}");
    respond(reply, 200, &serde_json::to_value(&pv1).expect("pv"));
    let (event, reply) = api.expect("POST", "/apis/events.k8s.io/v1/namespaces/default/events").await;
    assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Warning"), Some("SecretNotFound")));
    respond(reply, 201, &event);
    assert_eq!(task.await.expect("task").expect("reconcile"), Action::requeue(BACKOFF * 4), "third failure: 30 s × 4");
}

/// The annotation patch failing is the one reconcile error: retried after the first backoff.
#[tokio::test]
async fn a_result_that_cannot_be_recorded_is_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::local_store(dir.path());
    volume_with_garbage(&store, "pvc-3/", 1).await;
    let root = Location::parse(&format!("file://{}", dir.path().display()), false).expect("root");
    let handle = root.child("pvc-3").url();
    let (client, mut api) = mock_client();
    let ctx = context(client, Arc::new(Stores::new(common::fast_policy())), Some(root), Arc::new(SystemClock));
    let p = Arc::new(pv("pv-3", DRIVER, &handle, json!({}), json!({})));
    let task = tokio::spawn(reconcile::reconcile(p.clone(), ctx.clone()));
    let (_, reply) = api.expect("PATCH", "/api/v1/persistentvolumes/pv-3").await;
    respond(reply, 403, &status(403, "Forbidden"));
    let err = task.await.expect("task").expect_err("the patch was refused");
    assert!(err.to_string().contains("pv-3"), "{err}");
    assert_eq!(reconcile::error_policy(p.clone(), &err, ctx.clone()), Action::requeue(BACKOFF));
    // The retry records that result; it does not compact again (it did at
    // every backoff while the patch failed: hourly compactions every
    // minute). Garbage made meanwhile stays until the next one is due.
    let v = Volume::open(store.clone(), "pvc-3/", OpenOptions::default()).await.expect("open");
    v.write(0, &vec![9; CS as usize]).await.expect("write");
    v.flush().await.expect("flush");
    drop(v);
    let before = chunk_objects(&store, "pvc-3/").await;
    let task = tokio::spawn(reconcile::reconcile(p, ctx));
    let (patch, reply) = api.expect("PATCH", "/api/v1/persistentvolumes/pv-3").await;
    assert!(annotation(&patch, ANN_RESULT).as_str().is_some_and(|r| r.starts_with("ok")), "{patch}");
    respond(reply, 200, &json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv-3"}}));
    let next = task.await.expect("task").expect("the result recorded");
    assert_ne!(next, Action::await_change());
    assert_eq!(chunk_objects(&store, "pvc-3/").await, before, "the retry compacted again");
    api.expect_silence().await;
}

/// A local path outside `--store` is refused without touching it.
#[tokio::test]
async fn a_local_volume_outside_the_store_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::local_store(dir.path());
    volume_with_garbage(&store, "pvc-4/", 3).await;
    let handle = Location::parse(&format!("file://{}/pvc-4", dir.path().display()), true).expect("loc").url();
    let (client, mut api) = mock_client();
    let elsewhere = Location::parse("file:///nonexistent/store", false).expect("root");
    let ctx = context(client, Arc::new(Stores::default()), Some(elsewhere), Arc::new(SystemClock));
    let task = tokio::spawn(reconcile::reconcile(Arc::new(pv("pv-4", DRIVER, &handle, json!({}), json!({}))), ctx));
    let (patch, reply) = api.expect("PATCH", "/api/v1/persistentvolumes/pv-4").await;
    let result = annotation(&patch, ANN_RESULT).as_str().expect("a result");
    assert!(result.contains("InvalidVolumeHandle") && result.contains("outside --store"), "{result}");
    respond(reply, 200, &json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv-4"}}));
    let (event, reply) = api.expect("POST", "/apis/events.k8s.io/v1/namespaces/default/events").await;
    assert_eq!(event["reason"], "InvalidVolumeHandle");
    respond(reply, 201, &event);
    task.await.expect("task").expect("reconcile");
    assert_eq!(chunk_objects(&store, "pvc-4/").await, 3, "nothing deleted");
}

/// A PV whose volume is not in the store: a failure with its own reason.
#[tokio::test]
async fn a_pv_whose_volume_is_gone_gets_a_volume_not_found_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = Location::parse(&format!("file://{}", dir.path().display()), false).expect("root");
    let handle = root.child("pvc-gone").url();
    let (client, mut api) = mock_client();
    let ctx = context(client, Arc::new(Stores::new(common::fast_policy())), Some(root), Arc::new(SystemClock));
    let task = tokio::spawn(reconcile::reconcile(Arc::new(pv("pv-6", DRIVER, &handle, json!({}), json!({}))), ctx));
    let (patch, reply) = api.expect("PATCH", "/api/v1/persistentvolumes/pv-6").await;
    let result = annotation(&patch, ANN_RESULT).as_str().expect("a result");
    assert!(result.starts_with("failed (VolumeNotFound)"), "{result}");
    assert_eq!(annotation(&patch, ANN_FAILURES), "1");
    respond(reply, 200, &json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv-6"}}));
    let (event, reply) = api.expect("POST", "/apis/events.k8s.io/v1/namespaces/default/events").await;
    assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Warning"), Some("VolumeNotFound")));
    respond(reply, 201, &event);
    assert_eq!(task.await.expect("task").expect("reconcile"), Action::requeue(BACKOFF));
}

/// On S3 (moto): the credentials and endpoint come from the Secret the PV
/// names; the controller's own environment has none, so the compaction
/// succeeds only through them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pvs_secret_supplies_the_store_credentials() {
    let Some(endpoint) = common::s3_endpoint() else { return };
    let bucket = common::unique("kube");
    let Some(raw) = common::s3_raw_store(&bucket).await else { return };
    let store: DynStore = Arc::new(s3blk::store::retry::RetryStore::new(raw, common::fast_policy()));
    volume_with_garbage(&store, "k8s/pvc-5/", 3).await;
    let handle = format!("s3://{bucket}/k8s/pvc-5");
    let (client, mut api) = mock_client();
    // No default settings: without the secret the store would be AWS itself.
    let ctx = context(client, Arc::new(Stores::new(common::fast_policy())), None, Arc::new(SystemClock));
    let secret_ref = json!({"controllerPublishSecretRef": {"name": "s3-creds", "namespace": "storage"}});
    let p = pv("pv-5", DRIVER, &handle, json!({}), secret_ref);
    let task = tokio::spawn(reconcile::reconcile(Arc::new(p.clone()), ctx));

    let (_, reply) = api.expect("GET", "/api/v1/namespaces/storage/secrets/s3-creds").await;
    let b64 = |s: &str| {
        use std::process::{Command, Stdio};
        let mut c =
            Command::new("base64").arg("-w0").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("base64");
        std::io::Write::write_all(c.stdin.as_mut().expect("stdin"), s.as_bytes()).expect("write");
        String::from_utf8(c.wait_with_output().expect("base64").stdout).expect("utf8")
    };
    respond(
        reply,
        200,
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds", "namespace": "storage"},
                "data": {"accessKeyID": b64("testing"), "secretAccessKey": b64("testing"),
                         "endpoint": b64(&endpoint), "region": b64("us-east-1")}}),
    );
    let (patch, reply) = api.expect("PATCH", "/api/v1/persistentvolumes/pv-5").await;
    let result = annotation(&patch, ANN_RESULT).as_str().expect("a result");
    assert!(result.starts_with("ok: deleted 2 chunk objects"), "{result}");
    respond(reply, 200, &serde_json::to_value(&p).expect("pv"));
    let (event, reply) = api.expect("POST", "/apis/events.k8s.io/v1/namespaces/default/events").await;
    assert_eq!(event["reason"], "Compacted");
    respond(reply, 201, &event);
    assert_eq!(task.await.expect("task").expect("reconcile"), Action::requeue(INTERVAL));
    assert_eq!(chunk_objects(&store, "k8s/pvc-5/").await, 1);
}

#[test]
fn fenced_writers_and_unreadable_snapshots_get_warning_events() {
    let quiet = Outcome::Compacted(CompactReport::default());
    assert!(reconcile::events_for(&quiet).is_empty(), "nothing changed, nothing to tell");
    let report = CompactReport {
        stale_records: vec![7, 8],
        unreadable_snapshots: vec!["snapshots/x.json".into()],
        ..CompactReport::default()
    };
    let events = reconcile::events_for(&Outcome::Compacted(report));
    let reasons: Vec<&str> = events.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(reasons, ["FencedWriter", "SnapshotUnreadable"]);
    assert!(events[0].note.as_deref().is_some_and(|n| n.contains("[7, 8]")));
}

// ------------------------------------------------------------ orphans

/// Volumes under `--store` that no PV names are reported, never deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_without_a_pv_are_reported_as_orphans_and_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = common::local_store(dir.path());
    for v in ["pvc-a/", "pvc-b/", "pvc-c/"] {
        volume_with_garbage(&store, v, 2).await;
    }
    store
        .put("not-a-volume/readme.txt", bytes::Bytes::from_static(b"x"), store::PutMode::Overwrite)
        .await
        .expect("put");
    let root = Location::parse(&format!("file://{}", dir.path().display()), false).expect("root");
    let handles: BTreeSet<String> = [root.child("pvc-b").url()].into_iter().collect();
    let stores = Stores::new(common::fast_policy());
    let opts = CompactOptions { safety_age: Duration::ZERO, ..CompactOptions::default() };
    let scan = orphans::scan_store(&root, &stores, &handles, &opts, &SystemClock).await.expect("scan");
    assert_eq!(scan.orphans, [root.child("pvc-a").url(), root.child("pvc-c").url()]);
    assert!(s3blk::metrics::render().contains("\ns3blk_orphan_volumes 2\n"));
    for v in ["pvc-a/", "pvc-b/", "pvc-c/"] {
        assert_eq!(chunk_objects(&store, v).await, 2, "{v}: neither deleted nor compacted");
    }
    assert!(store.head("not-a-volume/readme.txt").await.expect("head").is_some());
    // A PV handle in another spelling of the same URL still counts.
    let handles: BTreeSet<String> =
        [&root.child("pvc-a").url(), &root.child("pvc-b").url(), &root.child("pvc-c").url()]
            .into_iter()
            .filter_map(|h| orphans::canonical_handle(&h.replace("file://", "file:///./")))
            .collect();
    let scan = orphans::scan_store(&root, &stores, &handles, &opts, &SystemClock).await.expect("scan");
    assert!(scan.orphans.is_empty(), "{:?}", scan.orphans);
}

// ------------------------------------------------------------ leader election

/// A scripted API server holding one Lease, with the real server's
/// optimistic concurrency: create fails if it exists, a replace naming a
/// resourceVersion fails unless it is the current one.
#[derive(Default)]
struct LeaseServer {
    lease: Mutex<Option<Value>>,
    version: AtomicUsize,
    /// Applied to the stored Lease right after the next GET is answered
    /// (with a fresh resourceVersion): another replica's write landing
    /// between a candidate's read and its write.
    #[allow(clippy::type_complexity)]
    after_next_get: Mutex<Option<Box<dyn FnOnce(&mut Value, usize) + Send>>>,
}

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/s3blk/leases";

impl LeaseServer {
    fn client(self: &Arc<Self>) -> (Client, tokio::task::JoinHandle<()>) {
        let (client, task, _) = self.client_cut_off_by();
        (client, task)
    }

    /// A client whose requests go unanswered, their connections kept open,
    /// once the returned flag is set (the API server cut off mid-way).
    fn client_cut_off_by(self: &Arc<Self>) -> (Client, tokio::task::JoinHandle<()>, Arc<AtomicBool>) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = self.clone();
        let cut = Arc::new(AtomicBool::new(false));
        let cut_off = cut.clone();
        let task = tokio::spawn(async move {
            let mut unanswered = Vec::new();
            while let Some((req, reply)) = handle.next_request().await {
                if cut_off.load(Ordering::SeqCst) {
                    unanswered.push(reply);
                    continue;
                }
                let (method, path) = (req.method().as_str().to_string(), req.uri().path().to_string());
                let body = body_json(req).await;
                let (code, answer) = server.answer(&method, &path, body);
                respond(reply, code, &answer);
            }
        });
        (Client::new(service, "s3blk"), task, cut)
    }

    fn answer(&self, method: &str, path: &str, mut body: Value) -> (u16, Value) {
        let mut lease = self.lease.lock().expect("lock");
        let named = format!("{LEASES}/compaction");
        match (method, path) {
            ("GET", p) if p == named => match lease.as_mut() {
                Some(l) => {
                    let answer = l.clone();
                    if let Some(hook) = self.after_next_get.lock().expect("lock").take() {
                        hook(l, self.version.fetch_add(1, Ordering::SeqCst) + 1);
                    }
                    (200, answer)
                }
                None => (404, status(404, "NotFound")),
            },
            ("POST", LEASES) if lease.is_some() => (409, status(409, "AlreadyExists")),
            ("POST", LEASES) => {
                let v = self.version.fetch_add(1, Ordering::SeqCst) + 1;
                body["metadata"]["resourceVersion"] = json!(v.to_string());
                *lease = Some(body.clone());
                (201, body)
            }
            ("PUT", p) if p == named => {
                let Some(current) = lease.as_ref().map(|l| l["metadata"]["resourceVersion"].clone()) else {
                    return (404, status(404, "NotFound"));
                };
                // As the real server: a replace that names a resourceVersion
                // is conditional on it; one that names none is not.
                let asked = &body["metadata"]["resourceVersion"];
                if !asked.is_null() && *asked != current {
                    return (409, status(409, "Conflict"));
                }
                let v = self.version.fetch_add(1, Ordering::SeqCst) + 1;
                body["metadata"]["resourceVersion"] = json!(v.to_string());
                *lease = Some(body.clone());
                (200, body)
            }
            _ => (404, status(404, "NotFound")),
        }
    }

    fn holder(&self) -> Option<String> {
        let l = self.lease.lock().expect("lock");
        l.as_ref().and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
    }

    fn transitions(&self) -> i64 {
        let l = self.lease.lock().expect("lock");
        l.as_ref().and_then(|l| l["spec"]["leaseTransitions"].as_i64()).unwrap_or(-1)
    }
}

/// The timing the controller runs with (the README states it).
fn timing() -> LeaseTiming {
    let t = LeaseTiming::default();
    assert_eq!(
        (t.duration, t.renew_deadline, t.retry_period),
        (Duration::from_secs(15), Duration::from_secs(10), Duration::from_secs(2))
    );
    t
}

fn lock(client: Client, identity: &str) -> LeaseLock {
    LeaseLock::new(Api::<Lease>::namespaced(client, "s3blk"), "compaction", identity, timing())
}

/// Two candidates, one Lease, time stepped by hand: the first leads and
/// renews; the second follows while renewals come, and takes over once the
/// record has not changed for a lease duration on its own clock.
#[tokio::test]
async fn only_one_candidate_leads_and_the_other_takes_over_after_expiry() {
    let server = Arc::new(LeaseServer::default());
    let (ca, _ta) = server.client();
    let (cb, _tb) = server.client();
    let (mut a, mut b) = (lock(ca, "replica-a"), lock(cb, "replica-b"));
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);

    assert_eq!(a.try_acquire_or_renew(at(0)).await.expect("a"), Round::Leading);
    assert_eq!(b.try_acquire_or_renew(at(0)).await.expect("b"), Round::Following { holder: "replica-a".into() });
    for s in [2, 4, 6, 8, 10, 12, 14, 16, 18, 20] {
        assert_eq!(a.try_acquire_or_renew(at(s)).await.expect("a renews"), Round::Leading);
        assert!(a.still_leading(at(s)));
        let r = b.try_acquire_or_renew(at(s + 1)).await.expect("b");
        assert_eq!(r, Round::Following { holder: "replica-a".into() }, "at {s}s: renewed, not expired");
        assert!(!b.still_leading(at(s + 1)));
    }
    assert_eq!(server.transitions(), 0);

    // A stops renewing (its process is gone, or cut off from the API) after t=20.
    assert!(a.still_leading(at(29)), "inside the renew deadline");
    assert!(!a.still_leading(at(30)), "a leader that cannot renew stops before anyone may take over");
    for s in [23, 27, 33] {
        assert_eq!(b.try_acquire_or_renew(at(s)).await.expect("b"), Round::Following { holder: "replica-a".into() });
    }
    // B first saw the last renewal at t=21: expired at 21 + 15.
    assert_eq!(b.try_acquire_or_renew(at(36)).await.expect("b"), Round::Leading);
    assert_eq!(server.holder().as_deref(), Some("replica-b"));
    assert_eq!(server.transitions(), 1);
    // A comes back: it follows.
    assert_eq!(a.try_acquire_or_renew(at(37)).await.expect("a"), Round::Following { holder: "replica-b".into() });
    assert!(!a.still_leading(at(37)));
}

/// A takeover based on a read that another write overtook loses: the
/// replace carries the resourceVersion read, the server answers 409, and
/// the candidate does not lead.
#[tokio::test]
async fn a_takeover_racing_a_renewal_loses_on_the_resource_version() {
    let server = Arc::new(LeaseServer::default());
    let (ca, _ta) = server.client();
    let (cb, _tb) = server.client();
    let (mut a, mut b) = (lock(ca, "replica-a"), lock(cb, "replica-b"));
    let t0 = Instant::now();
    assert_eq!(a.try_acquire_or_renew(t0).await.expect("a"), Round::Leading);
    assert_eq!(b.try_acquire_or_renew(t0).await.expect("b"), Round::Following { holder: "replica-a".into() });
    // B sees the record unchanged for 16 s and replaces it; between its read
    // and its write, A's renewal lands.
    *server.after_next_get.lock().expect("lock") = Some(Box::new(|lease: &mut Value, version: usize| {
        lease["spec"]["renewTime"] = json!(Timestamp::now().to_string());
        lease["metadata"]["resourceVersion"] = json!(version.to_string());
    }));
    assert_eq!(b.try_acquire_or_renew(t0 + Duration::from_secs(16)).await.expect("b"), Round::Conflict);
    assert!(!b.still_leading(t0 + Duration::from_secs(16)));
    assert_eq!(server.holder().as_deref(), Some("replica-a"));
    assert_eq!(server.transitions(), 0);
    // Two candidates creating the Lease at once: the second create gets 409.
    let fresh = Arc::new(LeaseServer::default());
    let (cc, _tc) = fresh.client();
    let (cd, _td) = fresh.client();
    let mut c = lock(cc, "replica-c");
    let mut d = lock(cd, "replica-d");
    let (rc, rd) = tokio::join!(c.try_acquire_or_renew(t0), d.try_acquire_or_renew(t0));
    let mut rounds = [rc.expect("c"), rd.expect("d")];
    rounds.sort_by_key(|r| format!("{r:?}"));
    assert!(
        matches!(rounds, [Round::Conflict, Round::Leading] | [Round::Following { .. }, Round::Leading]),
        "{rounds:?}"
    );
}

/// The work a replica runs while it leads, counting the replicas running
/// it at once (`most`: the most ever) and which started it, in order.
#[derive(Clone, Default)]
struct LeaderWork {
    active: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    started: Arc<Mutex<Vec<&'static str>>>,
}

impl LeaderWork {
    fn of(&self, name: &'static str) -> impl FnMut() -> futures::future::BoxFuture<'static, ()> + Send + 'static {
        let w = self.clone();
        move || {
            let w = w.clone();
            Box::pin(async move {
                struct Running(Arc<AtomicUsize>);
                impl Drop for Running {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let n = w.active.fetch_add(1, Ordering::SeqCst) + 1;
                w.most.fetch_max(n, Ordering::SeqCst);
                w.started.lock().expect("lock").push(name);
                let _running = Running(w.active.clone());
                std::future::pending::<()>().await
            })
        }
    }
}

/// The election loop with two replicas on tokio's paused clock: exactly one
/// runs the work at any time; when the leader's loop dies, the other starts
/// the work after the lease expires.
#[tokio::test(start_paused = true)]
async fn the_election_loop_runs_the_work_in_one_replica_and_fails_over() {
    let server = Arc::new(LeaseServer::default());
    let work = LeaderWork::default();
    let (active, most, started) = (work.active.clone(), work.most.clone(), work.started.clone());
    let replica = |name: &'static str, stop: tokio::sync::oneshot::Receiver<()>| {
        let (client, _task) = server.client();
        let stop = async move {
            let _ = stop.await;
        };
        tokio::spawn(elect_and_run(lock(client, name), work.of(name), stop))
    };
    let (_stop_a, stop) = tokio::sync::oneshot::channel();
    let a = replica("replica-a", stop);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (stop_b, stop) = tokio::sync::oneshot::channel();
    let b = replica("replica-b", stop);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(*started.lock().expect("lock"), ["replica-a"]);
    assert_eq!(active.load(Ordering::SeqCst), 1);
    assert_eq!(server.holder().as_deref(), Some("replica-a"));

    a.abort(); // the leader dies; its work is aborted with its loop
    let died = Instant::now();
    while started.lock().expect("lock").len() < 2 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(died.elapsed() < Duration::from_secs(30), "no takeover");
    }
    let took = died.elapsed();
    assert!(took >= Duration::from_secs(13), "took over after {took:?}, before the lease could expire");
    assert_eq!(*started.lock().expect("lock"), ["replica-a", "replica-b"]);
    assert_eq!(most.load(Ordering::SeqCst), 1, "never two replicas at once");
    assert_eq!(active.load(Ordering::SeqCst), 1);
    assert_eq!(server.holder().as_deref(), Some("replica-b"));
    assert!(s3blk::metrics::render().contains("\ns3blk_compaction_leader 1\n"));

    // B shuts down gracefully: its work stops, the Lease is handed back,
    // and a third replica leads at its next round, not a lease duration later.
    let (_stop_c, stop) = tokio::sync::oneshot::channel();
    let c = replica("replica-c", stop);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(server.holder().as_deref(), Some("replica-b"));
    let _ = stop_b.send(());
    let asked = Instant::now();
    b.await.expect("b's election loop ends after its stop");
    assert_eq!(active.load(Ordering::SeqCst), 0, "b's work stopped before its loop ended");
    assert_eq!(server.holder(), None, "the Lease was handed back");
    while started.lock().expect("lock").len() < 3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(asked.elapsed() < Duration::from_secs(30), "no takeover");
    }
    let took = asked.elapsed();
    assert!(took <= timing().retry_period + Duration::from_millis(500), "took over {took:?} after a graceful stop");
    assert_eq!(*started.lock().expect("lock"), ["replica-a", "replica-b", "replica-c"]);
    assert_eq!(most.load(Ordering::SeqCst), 1, "never two replicas at once");
    c.abort();
}

/// A leader whose lease round hangs (the API server unreachable, the
/// connection still open: no answer, no error) stops its work within the
/// renew deadline, before another replica may take over. The round had no
/// time limit, so the leader worked on for as long as the connection hung,
/// beside the replica that took over.
#[tokio::test(start_paused = true)]
async fn a_leader_whose_renewal_hangs_stops_before_another_takes_over() {
    let server = Arc::new(LeaseServer::default());
    let work = LeaderWork::default();
    let (active, most) = (work.active.clone(), work.most.clone());
    let replica = |client: Client, name: &'static str| {
        tokio::spawn(elect_and_run(lock(client, name), work.of(name), std::future::pending::<()>()))
    };
    let (ca, _ta, cut_a) = server.client_cut_off_by();
    let a = replica(ca, "replica-a");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (cb, _tb) = server.client();
    let b = replica(cb, "replica-b");
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(server.holder().as_deref(), Some("replica-a"));
    cut_a.store(true, Ordering::SeqCst);
    let cut = Instant::now();
    while server.holder().as_deref() != Some("replica-b") {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(cut.elapsed() < Duration::from_secs(60), "no takeover");
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(most.load(Ordering::SeqCst), 1, "the cut-off leader worked on beside the new one");
    assert_eq!(active.load(Ordering::SeqCst), 1);
    a.abort();
    b.abort();
}

// ------------------------------------------------------------ choosing the mode

/// `s3blk csi` without any Kubernetes API configuration: `kubernetes`
/// refuses to start and names the cause; `auto` falls back to the pass over
/// `--store`; each mode is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compaction_mode_is_chosen_and_logged() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let command = |mode: &str| {
        let mut c = tokio::process::Command::new(common::s3blk_bin());
        c.args(["csi", "--mode", "controller"])
            .arg(format!("--endpoint=unix://{}/csi-{mode}.sock", dir.path().display()))
            .arg(format!("--store=file://{}/store", dir.path().display()))
            .arg(format!("--compaction={mode}"))
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env_remove("S3BLK_COMPACTION")
            .env("HOME", dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        c
    };
    let out = tokio::time::timeout(Duration::from_secs(60), command("kubernetes").output())
        .await
        .expect("exits in time")
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--compaction=kubernetes: no Kubernetes API configuration"), "{stderr}");

    for (mode, line) in [("auto", "compaction mode: store"), ("off", "compaction mode: off")] {
        let mut child = command(mode).spawn().expect("spawn");
        let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
        let found = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(l)) = lines.next_line().await {
                if l.contains(line) {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(found, Ok(true), "--compaction={mode} logs {line:?}");
        child.kill().await.expect("kill");
    }
}

// ------------------------------------------------------------ node recovery
//
// A restarted node plugin serves its staged volumes again only while a
// VolumeAttachment of this driver still attaches them to this node. The
// API is scripted as above (no API server exists here); the volumes, their
// store attachment records and the node's stage records are real. The
// devices are not (attaching needs a kernel, see tests/csi_node.rs): the
// node serves a volume on its socket and logs that the device could not
// be reconnected, which is all these tests look at.

struct Restarted {
    node: Arc<s3blk::csi::node::NodeService>,
    ids: Vec<String>,
    state: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// Volumes `names`, each published to node-a in its store and staged on
/// node-a before a restart; a node plugin for node-a that has just started
/// and consults `client`.
async fn restarted_node(client: Client, names: &[&str]) -> Restarted {
    restarted_node_with(client, names, None).await
}

/// [`restarted_node`]; with `key`, the volumes are encrypted and their
/// stage records carry the key among their stage secrets.
async fn restarted_node_with(client: Client, names: &[&str], key: Option<&str>) -> Restarted {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("store");
    std::fs::create_dir_all(&root).expect("store dir");
    let store = common::local_store(&root);
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let mut ids = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let loc = Location::parse(&format!("file://{}/{name}", root.display()), true).expect("url");
        let opts = CreateOptions {
            encryption: key
                .map(|k| s3blk::volume::keys::NewKeys::fresh(s3blk::crypto::Kek::parse(k.as_bytes()).expect("a key"))),
            ..CreateOptions::new(4 * CS as u64, CS)
        };
        Volume::create(store.clone(), &loc.prefix, opts, &SystemClock).await.expect("create");
        let a = s3blk::volume::catalog::Attachment { node_id: "node-a".into(), readonly: false, created_unix: now() };
        s3blk::volume::catalog::attach(&store, &loc.prefix, &a).await.expect("publish");
        let record = json!({
            "volume_id": loc.url(), "staging_path": dir.path().join(format!("staging-{i}")),
            "device": format!("/dev/nbd-test-{i}"), "socket": state.join(format!("{i}.sock")),
            "export": format!("export-{i}"), "fs_type": null, "readonly": false, "cache_limit": 1 << 20,
        });
        let mut record = record;
        if let Some(k) = key {
            // As an earlier version kept them: moved to the secrets directory on the way.
            record["has_secrets"] = json!(true);
            record["encrypted"] = json!(true);
            record["secrets"] = json!({ "encryptionKey": k });
        }
        std::fs::write(state.join(format!("{i}.json")), record.to_string()).expect("stage record");
        ids.push(loc.url());
    }
    let cfg = s3blk::csi::node::NodeConfig {
        node_id: "node-a".into(),
        state_dir: state.clone(),
        secrets_dir: dir.path().join("secrets"),
        max_volumes: 16,
        budget: s3blk::volume::budget::MemoryBudget::new(16 << 20, 16 << 20),
        cache_limit: 16 << 20,
        busy_poll: Duration::ZERO,
        write_log_limit: 1 << 30,
        patch_limit: s3blk::volume::engine::DEFAULT_PATCH_LIMIT,
        nbd_inflight: s3blk::csi::node::nbd_inflight(None),
    };
    let node = s3blk::csi::node::NodeService::new(cfg, Arc::new(Stores::new(common::fast_policy())))
        .expect("node service")
        .with_kubernetes(s3blk::csi::attachments::NodeAttachments::new(client, DRIVER));
    Restarted { node: node.into_arc(), ids, state, _dir: dir }
}

impl Restarted {
    /// Is the volume served by the plugin (NodeGetVolumeStats knows it)?
    async fn serves(&self, id: &str) -> bool {
        use s3blk::csi::pb::node_server::Node;
        let req = s3blk::csi::pb::NodeGetVolumeStatsRequest {
            volume_id: id.to_string(),
            volume_path: self.state.display().to_string(),
            staging_target_path: String::new(),
        };
        match self.node.node_get_volume_stats(tonic::Request::new(req)).await {
            Ok(_) => true,
            Err(s) if s.code() == tonic::Code::NotFound => false,
            Err(s) => panic!("volume stats of {id}: {s}"),
        }
    }
}

fn volume_attachment(name: &str, attacher: &str, node: &str, pv: &str, deleting: bool) -> Value {
    let mut meta = json!({"name": name});
    if deleting {
        meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment", "metadata": meta,
        "spec": {"attacher": attacher, "nodeName": node, "source": {"persistentVolumeName": pv}},
        "status": {"attached": true},
    })
}

#[tokio::test]
async fn a_restarted_node_serves_again_only_volumes_a_volume_attachment_still_attaches_here() {
    let (client, mut api) = mock_client();
    let r = restarted_node(client, &["kept", "detached", "moved", "detaching"]).await;
    let (kept, detached, moved, detaching) = (&r.ids[0], &r.ids[1], &r.ids[2], &r.ids[3]);
    let recovery = r.node.recover();
    let (_, reply) = api.expect("GET", "/apis/storage.k8s.io/v1/volumeattachments").await;
    let items = json!([
        volume_attachment("va-kept", DRIVER, "node-a", "pv-kept", false),
        // `detached` has none; `moved` is attached to another node now.
        volume_attachment("va-moved", DRIVER, "node-b", "pv-moved", false),
        volume_attachment("va-detaching", DRIVER, "node-a", "pv-detaching", true),
        // Another driver's attachment to this node of a PV of ours is not ours.
        volume_attachment("va-other", "ebs.csi.aws.com", "node-a", "pv-detached", false),
    ]);
    let list = json!({"apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachmentList",
                      "metadata": {"resourceVersion": "10"}, "items": items});
    respond(reply, 200, &list);
    let (_, reply) = api.expect("GET", "/api/v1/persistentvolumes/pv-kept").await;
    respond(reply, 200, &serde_json::to_value(pv("pv-kept", DRIVER, kept, json!({}), json!({}))).expect("json"));
    tokio::time::timeout(Duration::from_secs(60), recovery).await.expect("recovery ends").expect("join");
    api.expect_silence().await;
    assert!(r.serves(kept).await, "the attached volume is served again");
    for id in [detached, moved, detaching] {
        assert!(!r.serves(id).await, "{id} is not attached here any more: not served");
    }
    // Their stage records stay for NodeUnstage to clean up.
    let records = std::fs::read_dir(&r.state).expect("state").flatten();
    assert_eq!(records.filter(|e| e.path().extension().is_some_and(|x| x == "json")).count(), 4);
}

/// A staged volume whose device recovery cannot connect again (here: the
/// device is gone) is reported abnormal, and a NodeStage tries to connect
/// it again and fails (UNAVAILABLE, kubelet retries) instead of answering
/// OK over a device whose I/O fails. It was reported healthy and staged.
#[tokio::test]
async fn a_device_recovery_cannot_connect_again_is_reported_and_not_staged() {
    use s3blk::csi::pb;
    use s3blk::csi::pb::node_server::Node;
    let (client, mut api) = mock_client();
    let r = restarted_node(client, &["no-device"]).await;
    let recovery = r.node.recover();
    let (_, reply) = api.expect("GET", "/apis/storage.k8s.io/v1/volumeattachments").await;
    respond(reply, 503, &status(503, "ServiceUnavailable"));
    tokio::time::timeout(Duration::from_secs(60), recovery).await.expect("recovery ends").expect("join");
    let id = &r.ids[0];
    let stats = pb::NodeGetVolumeStatsRequest {
        volume_id: id.clone(),
        volume_path: r.state.display().to_string(),
        staging_target_path: String::new(),
    };
    let stats = r.node.node_get_volume_stats(tonic::Request::new(stats)).await.expect("stats").into_inner();
    let condition = stats.volume_condition.expect("a condition");
    assert!(condition.abnormal && condition.message.contains("not connected"), "{condition:?}");
    let record: Value = serde_json::from_slice(&std::fs::read(r.state.join("0.json")).expect("record")).expect("json");
    let stage = pb::NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: record["staging_path"].as_str().expect("staging path").to_string(),
        volume_capability: Some(pb::VolumeCapability {
            access_type: Some(pb::volume_capability::AccessType::Block(pb::volume_capability::BlockVolume {})),
            access_mode: Some(pb::volume_capability::AccessMode {
                mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }),
        ..Default::default()
    };
    let staged = r.node.node_stage_volume(tonic::Request::new(stage)).await;
    assert_eq!(staged.as_ref().err().map(tonic::Status::code), Some(tonic::Code::Unavailable), "{staged:?}");
}

/// A stage record written in an earlier boot of the node names a device
/// that went with that boot and may be another tool's now (another nbd
/// client took the lowest free number): recovery drops the record and
/// touches nothing, and the volume is not served until a NodeStage stages
/// it afresh. It was served again on that device (reconnected, mounted,
/// later detached at NodeUnstage).
#[tokio::test]
async fn a_stage_record_of_an_earlier_boot_is_dropped_and_its_device_left_alone() {
    let (client, mut api) = mock_client();
    let r = restarted_node(client, &["rebooted"]).await;
    let path = r.state.join("0.json");
    let mut record: Value = serde_json::from_slice(&std::fs::read(&path).expect("record")).expect("json");
    record["boot"] = json!("an earlier boot");
    std::fs::write(&path, record.to_string()).expect("rewrite the record");

    let recovery = r.node.recover();
    tokio::time::timeout(Duration::from_secs(10), recovery)
        .await
        .expect("recovery ends without asking about the volume")
        .expect("join");
    api.expect_silence().await;
    assert!(!r.serves(&r.ids[0]).await, "a volume staged before the reboot was served again on its old device");
    assert!(!path.exists(), "the stage record of an earlier boot stayed");
}

/// A restarted node plugin serves an encrypted volume again with the key
/// its stage kept among the stage secrets (the kernel's reconnect finds it
/// served), and only with it.
#[tokio::test]
async fn a_restarted_node_serves_an_encrypted_volume_again_with_its_stage_key() {
    let key = "4d".repeat(32);
    for (given, served) in [(key.clone(), true), ("4e".repeat(32), false)] {
        let (client, mut api) = mock_client();
        let r = restarted_node_with(client, &["sealed"], Some(&key)).await;
        if !served {
            // The record's key is not the volume's.
            let path = r.state.join("0.json");
            let mut rec: Value = serde_json::from_slice(&std::fs::read(&path).expect("record")).expect("json");
            rec["secrets"] = json!({ "encryptionKey": given });
            std::fs::write(&path, rec.to_string()).expect("record");
        }
        let recovery = r.node.recover();
        let (_, reply) = api.expect("GET", "/apis/storage.k8s.io/v1/volumeattachments").await;
        respond(reply, 503, &status(503, "ServiceUnavailable"));
        tokio::time::timeout(Duration::from_secs(60), recovery).await.expect("recovery ends").expect("join");
        use s3blk::csi::pb::node_server::Node;
        let req = s3blk::csi::pb::NodeGetVolumeStatsRequest {
            volume_id: r.ids[0].clone(),
            volume_path: r.state.display().to_string(),
            staging_target_path: String::new(),
        };
        // Served again: only its (test) device is missing. Not served: the
        // volume it cannot open is reported so.
        let message = match r.node.node_get_volume_stats(tonic::Request::new(req)).await {
            Ok(stats) => stats.into_inner().volume_condition.expect("a condition").message,
            Err(s) => s.message().to_string(),
        };
        let device_only = message.contains("is not connected since the plugin restarted");
        assert_eq!(device_only, served, "key {}: {message}", &given[..4]);
    }
}

#[tokio::test]
async fn without_an_answer_from_the_api_a_restarted_node_serves_what_its_stores_say() {
    let (client, mut api) = mock_client();
    let r = restarted_node(client, &["one", "two"]).await;
    let recovery = r.node.recover();
    let (_, reply) = api.expect("GET", "/apis/storage.k8s.io/v1/volumeattachments").await;
    respond(reply, 503, &status(503, "ServiceUnavailable"));
    tokio::time::timeout(Duration::from_secs(60), recovery).await.expect("recovery ends").expect("join");
    for id in &r.ids {
        assert!(r.serves(id).await, "{id}: the store's attachment record names this node");
    }
}
