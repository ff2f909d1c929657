//! The S3 backend against real HTTP failures: the AWS SDK parses real error
//! responses and real broken connections, and the store must classify each
//! one (retry, give up, not found, conditional write refused) and the retry
//! layer must ride them out.
//!
//! moto, the real S3 server here, never throttles or fails, so the faults
//! come from a small HTTP proxy in front of it. Requests the proxy lets
//! through are answered by moto; the faults it injects are the error
//! responses S3 documents (503 SlowDown, 500 InternalError, 403
//! AccessDenied, 409 ConditionalRequestConflict) and connections dropped
//! after the request was sent. Only those injected answers are scripted.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use s3blk::clock::SystemClock;
use s3blk::store::retry::{RetryPolicy, RetryStore};
use s3blk::store::s3::S3Store;
use s3blk::store::{DynStore, ObjectStore, PutMode, StoreError};
use s3blk::volume::engine::{CreateOptions, OpenOptions, Volume};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does with a matching request.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// An S3 error response: status, error code.
    Error(u16, &'static str),
    /// Read the request, then close the connection without answering.
    Drop,
    /// Pass the request to moto, which applies it, then close the
    /// connection without passing the answer back.
    LoseAnswer,
}

#[derive(Debug)]
struct Rule {
    method: &'static str,
    path_contains: String,
    fault: Fault,
    times: usize,
}

#[derive(Debug, Default)]
struct Script {
    rules: Vec<Rule>,
    /// Every request seen, as "METHOD path", with what happened to it.
    log: Vec<(String, Option<Fault>)>,
}

#[derive(Clone)]
struct FaultProxy {
    endpoint: String,
    script: Arc<Mutex<Script>>,
}

impl FaultProxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let script = Arc::new(Mutex::new(Script::default()));
        let upstream = upstream.trim_start_matches("http://").to_string();
        let s = script.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(handle(conn, upstream.clone(), s.clone()));
            }
        });
        Self { endpoint, script }
    }

    fn fail(&self, method: &'static str, path_contains: &str, fault: Fault, times: usize) {
        let rule = Rule { method, path_contains: path_contains.to_string(), fault, times };
        self.script.lock().expect("script").rules.push(rule);
    }

    fn clear(&self) {
        self.script.lock().expect("script").rules.clear();
    }

    /// How many requests matching `method` and `path_contains` were answered with a fault.
    fn faulted(&self, method: &str, path_contains: &str) -> usize {
        let s = self.script.lock().expect("script");
        s.log.iter().filter(|(r, f)| f.is_some() && r.starts_with(method) && r.contains(path_contains)).count()
    }
}

/// Read up to the end of an HTTP head; `None` when the peer closed first.
async fn read_head(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(p + 4);
        }
        let mut chunk = [0u8; 8192];
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > (1 << 20) {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

/// The head with `Connection: close`, so that each request has a
/// connection of its own and the proxy never has to track keep-alive.
fn close_head(head: &str) -> String {
    let mut out: Vec<&str> =
        head.trim_end().lines().filter(|l| !l.to_ascii_lowercase().starts_with("connection:")).collect();
    out.push("Connection: close");
    format!("{}\r\n\r\n", out.join("\r\n"))
}

async fn read_body(conn: &mut TcpStream, buf: &mut Vec<u8>, len: usize) -> bool {
    while buf.len() < len {
        let mut chunk = vec![0u8; (len - buf.len()).min(1 << 16)];
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

async fn handle(mut conn: TcpStream, upstream: String, script: Arc<Mutex<Script>>) {
    let mut buf = Vec::new();
    let Some(head_len) = read_head(&mut conn, &mut buf).await else { return };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let mut body = buf.split_off(head_len);
    let request_line = head.lines().next().unwrap_or_default().to_string();
    let mut parts = request_line.split(' ');
    let (method, path) = (parts.next().unwrap_or_default().to_string(), parts.next().unwrap_or_default().to_string());
    assert!(
        header(&head, "transfer-encoding").is_none(),
        "the SDK sent a chunked body; custom endpoints must use checksums 'when required': {head}"
    );
    let len = header(&head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0usize);
    if !read_body(&mut conn, &mut body, len).await {
        return;
    }
    let fault = {
        let mut s = script.lock().expect("script");
        let hit = s.rules.iter_mut().find(|r| r.times > 0 && r.method == method && path.contains(&r.path_contains));
        let fault = hit.map(|r| {
            r.times -= 1;
            r.fault
        });
        s.log.push((format!("{method} {path}"), fault));
        fault
    };
    match fault {
        Some(Fault::Drop) => {}
        Some(Fault::Error(status, code)) => {
            let xml = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
                 <Message>injected by the test proxy</Message><RequestId>s3blk-test</RequestId></Error>"
            );
            // HEAD answers carry no body, as from S3.
            let body = if method == "HEAD" { String::new() } else { xml };
            let resp = format!(
                "HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
                 x-amz-request-id: s3blk-test\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
        }
        None | Some(Fault::LoseAnswer) => {
            let Ok(mut up) = TcpStream::connect(&upstream).await else { return };
            if up.write_all(close_head(&head).as_bytes()).await.is_err() || up.write_all(&body).await.is_err() {
                return;
            }
            // Relay the answer; moto closes after it (Connection: close).
            let mut answer = Vec::new();
            let _ = up.read_to_end(&mut answer).await;
            if fault.is_none() {
                let _ = conn.write_all(&answer).await;
            }
        }
    }
    let _ = conn.shutdown().await;
}

/// A bucket on moto and an S3 store that reaches it through the proxy.
async fn setup() -> Option<(FaultProxy, Arc<S3Store>, String)> {
    let ep = common::s3_endpoint()?;
    let bucket = common::unique("faults");
    common::s3_raw_store(&bucket).await?;
    let proxy = FaultProxy::start(ep).await;
    let store = S3Store::connect(&bucket, common::s3_settings(&proxy.endpoint)).await.expect("s3 client");
    Some((proxy, Arc::new(store), bucket))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_s3_error_responses_are_classified() {
    let Some((proxy, s3, _bucket)) = setup().await else { return };
    let body = Bytes::from_static(b"payload");

    // Through to moto: the real answers.
    s3.put("k/one", body.clone(), PutMode::IfAbsent).await.expect("put");
    assert_eq!(s3.get("k/one", None).await.expect("get"), body);
    assert!(matches!(s3.put("k/one", body.clone(), PutMode::IfAbsent).await, Err(StoreError::PreconditionFailed(_))));
    assert!(matches!(s3.get("k/missing", None).await, Err(StoreError::NotFound(_))));
    assert_eq!(s3.head("k/missing").await.expect("head of a missing key"), None);
    s3.delete("k/missing").await.expect("deleting a missing key succeeds");

    // Injected: each must be classified as S3 documents it.
    let transient = [
        ("PUT", Fault::Error(503, "SlowDown")),
        ("PUT", Fault::Error(500, "InternalError")),
        ("GET", Fault::Error(503, "ServiceUnavailable")),
        ("GET", Fault::Error(429, "TooManyRequests")),
        ("PUT", Fault::Error(409, "ConditionalRequestConflict")),
        ("HEAD", Fault::Error(503, "SlowDown")),
        ("GET", Fault::Drop),
        ("PUT", Fault::Drop),
    ];
    for (method, fault) in transient {
        proxy.fail(method, "k/one", fault, 1);
        let r = match method {
            "PUT" => s3.put("k/one", body.clone(), PutMode::Overwrite).await.map(drop),
            "HEAD" => s3.head("k/one").await.map(drop),
            _ => s3.get("k/one", None).await.map(drop),
        };
        match r {
            Err(StoreError::Transient(msg)) => {
                if let Fault::Error(status, code) = fault {
                    assert!(msg.contains(&status.to_string()), "{msg}");
                    if method != "HEAD" {
                        assert!(msg.contains(code), "{msg}");
                    }
                }
            }
            other => panic!("{method} answered {fault:?} must be transient, got {other:?}"),
        }
    }
    proxy.fail("PUT", "k/one", Fault::Error(403, "AccessDenied"), 1);
    match s3.put("k/one", body.clone(), PutMode::Overwrite).await {
        Err(StoreError::Permanent(msg)) => {
            assert!(msg.contains("403") && msg.contains("AccessDenied"), "{msg}");
            assert!(!msg.contains("testing"), "credentials leaked into an error: {msg}");
        }
        other => panic!("403 must be permanent, got {other:?}"),
    }
    assert_eq!(s3.get("k/one", None).await.expect("get after the faults"), body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_rides_out_throttling_and_dropped_connections() {
    let Some((proxy, s3, _bucket)) = setup().await else { return };
    let policy = RetryPolicy {
        max_attempts: 5,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(40),
        attempt_timeout: Duration::from_secs(20),
    };
    let store: DynStore = Arc::new(RetryStore::new(s3.clone(), policy));
    let size = 8u64 << 20;
    let create = CreateOptions::new(size, 1 << 20);
    proxy.fail("PUT", "vol/volume.json", Fault::Error(503, "SlowDown"), 2);
    Volume::create(store.clone(), "vol/", create, &SystemClock).await.expect("create rides out throttling");

    let v = Volume::open(store.clone(), "vol/", OpenOptions::default()).await.expect("open");
    let data = common::pattern(5, 3 << 20);
    v.write(512 << 10, &data).await.expect("write");
    proxy.fail("PUT", "vol/chunks/", Fault::Error(503, "SlowDown"), 3);
    proxy.fail("PUT", "vol/chunks/", Fault::Drop, 2);
    proxy.fail("PUT", "vol/journal/", Fault::Error(500, "InternalError"), 1);
    v.flush().await.expect("flush rides out throttling, resets and a 500");
    assert_eq!(proxy.faulted("PUT", "vol/chunks/"), 5);
    assert_eq!(proxy.faulted("PUT", "vol/journal/"), 1);

    // Past the retry budget: a clear error, nothing acknowledged, and the
    // volume recovers when the store does.
    let more = common::pattern(6, 1 << 20);
    v.write(6 << 20, &more).await.expect("write");
    proxy.fail("PUT", "vol/chunks/", Fault::Error(503, "SlowDown"), 1000);
    let e = v.flush().await.expect_err("flush must fail after the retry budget");
    assert!(e.to_string().contains("gave up after 5 attempts"), "{e}");
    proxy.clear();
    // The commit lands but its answer is lost: the retry meets 412, and the
    // writer must see the record is its own rather than call itself fenced.
    proxy.fail("PUT", "vol/journal/", Fault::LoseAnswer, 1);
    v.flush().await.expect("flush succeeds once the store recovers");
    assert_eq!(proxy.faulted("PUT", "vol/journal/"), 2);
    assert!(v.fenced().is_none());
    v.write(7 << 20, &more).await.expect("the writer goes on writing");
    v.flush().await.expect("and committing");
    drop(v);

    // Read back through a fresh engine, with GETs failing now and then.
    proxy.fail("GET", "vol/chunks/", Fault::Error(503, "SlowDown"), 2);
    proxy.fail("GET", "vol/chunks/", Fault::Drop, 1);
    let ro = OpenOptions { read_only: true, ..OpenOptions::default() };
    let r = Volume::open(store.clone(), "vol/", ro).await.expect("reopen");
    assert!(r.read(512 << 10, data.len() as u64).await.expect("read") == data);
    assert!(r.read(6 << 20, more.len() as u64).await.expect("read") == more);
    assert!(r.read(7 << 20, more.len() as u64).await.expect("read") == more);
    assert_eq!(proxy.faulted("GET", "vol/chunks/"), 3);
    let report = s3blk::volume::fsck::fsck(store.as_ref(), "vol/", true, &|_, _| {}).await.expect("fsck");
    assert!(report.clean, "fsck found damage: {:?}", report.errors);
}
