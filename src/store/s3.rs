//! Amazon S3 and S3-compatible stores (MinIO, Ceph RGW, R2, GCS, moto).
//!
//! Endpoint, region and credentials come from the AWS SDK's standard chain
//! (`AWS_ENDPOINT_URL[_S3]`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, profiles,
//! IRSA). A custom endpoint implies path-style addressing and, unless the
//! user says otherwise, checksums "when required": recent SDKs otherwise send
//! aws-chunked bodies with CRC trailers that several S3-compatible servers
//! reject. The SDK's own retries are disabled: [`super::retry::RetryStore`]
//! is the one retry layer.

use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::meta::region::RegionProviderChain;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_types::body::SdkBody;
use bytes::Bytes;
use md5::Digest;

use super::{ListPage, ListRequest, ObjectInfo, ObjectStore, PutMode, StoreError, StoreResult};

#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// The custom endpoint, or AWS's: named in connection errors.
    endpoint: String,
    /// The store has answered a call: missing credentials from now on are
    /// a refresh that failed (retried), no longer a setup mistake.
    answered: std::sync::Arc<std::sync::atomic::AtomicBool>,
    checksums: ChecksumMode,
    /// The server answered a ranged GET with the whole object.
    ignores_ranges: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

fn ignores_ranges(endpoint: &str) -> StoreError {
    StoreError::Permanent(format!("{endpoint} ignores Range in GET requests; whole objects are read instead"))
}

/// How the SDK computes request checksums (`S3BLK_S3_CHECKSUMS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumMode {
    Always,
    WhenRequired,
}

/// Explicit connection settings; anything left `None` comes from the
/// environment's standard AWS chain.
#[derive(Clone, Default)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Static credentials: (access key id, secret access key).
    pub credentials: Option<(String, String)>,
}

/// Never prints the credentials.
impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("credentials", &self.credentials.as_ref().map(|_| "redacted"))
            .finish()
    }
}

impl S3Store {
    /// Build a client from the environment's standard AWS configuration.
    pub async fn from_env(bucket: &str) -> StoreResult<Self> {
        Self::connect(bucket, S3Settings::default()).await
    }

    /// Build a client from explicit settings, falling back to the environment.
    pub async fn connect(bucket: &str, settings: S3Settings) -> StoreResult<Self> {
        let region = RegionProviderChain::first_try(settings.region.map(aws_config::Region::new))
            .or_default_provider()
            .or_else("us-east-1");
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).region(region);
        if let Some(ep) = &settings.endpoint {
            loader = loader.endpoint_url(ep);
        }
        if let Some((id, secret)) = settings.credentials {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(id, secret, None, None, "s3blk"));
        }
        let sdk = loader.load().await;
        let custom_endpoint = sdk.endpoint_url().is_some();
        let checksums = match std::env::var("S3BLK_S3_CHECKSUMS").ok().as_deref() {
            Some("always") => ChecksumMode::Always,
            Some("when-required") => ChecksumMode::WhenRequired,
            Some(other) => {
                return Err(StoreError::Permanent(format!(
                    "S3BLK_S3_CHECKSUMS must be 'always' or 'when-required', not {other:?}"
                )));
            }
            None if custom_endpoint => ChecksumMode::WhenRequired,
            None => ChecksumMode::Always,
        };
        let mut conf = aws_sdk_s3::config::Builder::from(&sdk).retry_config(RetryConfig::disabled()).timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(60))
                .build(),
        );
        if custom_endpoint {
            conf = conf.force_path_style(true);
        }
        if checksums == ChecksumMode::WhenRequired {
            conf = conf
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        }
        let endpoint = sdk.endpoint_url().map(str::to_string).unwrap_or_else(|| "AWS S3".to_string());
        Ok(Self {
            client: Client::from_conf(conf.build()),
            bucket: bucket.to_string(),
            endpoint,
            checksums,
            answered: Default::default(),
            ignores_ranges: Default::default(),
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }
}

/// An error and its causes in one line, from the outermost: `a: b: c`
/// (each only where it adds words), never Rust debug formatting.
fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = e.source();
    }
    out
}

impl S3Store {
    fn answered(&self) {
        self.answered.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    async fn put_body(&self, key: &str, body: ByteStream, mode: PutMode, md5: Option<String>) -> StoreResult<()> {
        let mut req = self.client.put_object().bucket(&self.bucket).key(key).body(body).set_content_md5(md5);
        if mode == PutMode::IfAbsent {
            req = req.if_none_match("*");
        }
        req.send().await.map_err(|e| self.map_err("PUT", key, e))?;
        self.answered();
        Ok(())
    }

    /// Map an SDK error to a store error, in the user's terms. Credentials
    /// never appear: only the status, the S3 error code and message.
    fn map_err<E: ProvideErrorMetadata + std::error::Error + 'static>(
        &self,
        what: &str,
        key: &str,
        err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> StoreError {
        if let SdkError::ServiceError(se) = &err
            && se.err().code() == Some("NoSuchBucket")
        {
            return StoreError::Permanent(format!("bucket {} does not exist (at {})", self.bucket, self.endpoint));
        }
        if let SdkError::DispatchFailure(e) = &err {
            let why = e.as_connector_error().map(|c| causes(c)).unwrap_or_else(|| "no detail".into());
            // No credentials is no network hiccup: retrying cannot help.
            let credentials = e.as_connector_error().is_some_and(|c| format!("{c:?}").contains("CredentialsNotLoaded"));
            if credentials && self.answered.load(std::sync::atomic::Ordering::Relaxed) {
                // Credentials that worked before and failed to refresh
                // (an IMDS or STS hiccup): worth retrying.
                return StoreError::Transient(format!("{what} {key}: refreshing the S3 credentials failed: {why}"));
            }
            if credentials {
                return StoreError::Permanent(format!(
                    "no S3 credentials found ({why}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
                     AWS_PROFILE, or run with an IAM role"
                ));
            }
            return StoreError::Transient(format!("{what} {key}: cannot connect to {}: {why}", self.endpoint));
        }
        map_err(what, key, err)
    }
}

/// Map an SDK error to a store error. Credentials never appear: only the
/// status, the S3 error code and message.
fn map_err<E: ProvideErrorMetadata + std::error::Error + 'static>(
    what: &str,
    key: &str,
    err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> StoreError {
    match &err {
        SdkError::TimeoutError(_) => StoreError::Transient(format!("{what} {key}: timeout")),
        SdkError::DispatchFailure(e) => StoreError::Transient(format!(
            "{what} {key}: connection failed: {}",
            e.as_connector_error().map(|c| causes(c)).unwrap_or_default()
        )),
        SdkError::ResponseError(_) => StoreError::Transient(format!("{what} {key}: malformed or cut response")),
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = se.err().code().unwrap_or("");
            let msg = se.err().message().unwrap_or("");
            let detail = format!("{what} {key}: HTTP {status} {code} {msg}").trim_end().to_string();
            match (status, code) {
                (404, _) | (_, "NoSuchKey") => StoreError::NotFound(key.to_string()),
                (412, _) | (_, "PreconditionFailed") => StoreError::PreconditionFailed(key.to_string()),
                // A header the server does not implement (If-Match on PUT).
                (501, _) | (_, "NotImplemented") => StoreError::Unsupported(detail),
                // A concurrent conditional write is in progress: retry, and the
                // retry gets the real answer (412 or success).
                (409, "ConditionalRequestConflict") => StoreError::Transient(detail),
                (429, _) | (500..=599, _) | (_, "SlowDown" | "RequestTimeout" | "InternalError") => {
                    StoreError::Transient(detail)
                }
                _ => StoreError::Permanent(detail),
            }
        }
        _ => StoreError::Permanent(format!("{what} {key}: {}", causes(&err))),
    }
}

/// How far before this host's clock a copy's Last-Modified may be and
/// still count as made now: half the shortest safety age of a compaction
/// beside live writers, so that a server that kept the source's time on
/// a copy is found out before compaction could take the copy for old.
const COPY_FRESH_SECS: i64 = 60;

/// A key as `x-amz-copy-source` takes it: percent-encoded but for the
/// unreserved characters and `/`.
fn copy_source_path(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parts sent one after the other as one request body, without a copy;
/// its exact length is the request's Content-Length.
struct PartsBody {
    parts: std::collections::VecDeque<Bytes>,
    left: u64,
}

impl PartsBody {
    fn new(parts: Vec<Bytes>) -> Self {
        let left = parts.iter().map(|p| p.len() as u64).sum();
        Self { parts: parts.into(), left }
    }
}

impl http_body::Body for PartsBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let next = self.parts.pop_front();
        if let Some(p) = &next {
            self.left -= p.len() as u64;
        }
        std::task::Poll::Ready(next.map(|p| Ok(http_body::Frame::data(p))))
    }

    fn is_end_stream(&self) -> bool {
        self.parts.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StoreResult<Bytes> {
        let mut req = self.client.get_object().bucket(&self.bucket).key(key);
        if let Some(r) = &range {
            if r.start >= r.end {
                return Ok(Bytes::new());
            }
            if self.ignores_ranges.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(ignores_ranges(&self.endpoint));
            }
            req = req.range(format!("bytes={}-{}", r.start, r.end - 1));
        }
        let out = req.send().await.map_err(|e| self.map_err("GET", key, e))?;
        self.answered();
        // A server that ignores Range answers with the whole object (no
        // Content-Range). Ranged reads are then refused from here on (no
        // request sent): the engine reads whole chunks instead, as it did
        // before it read ranges, rather than download a whole object for
        // every block.
        if range.is_some() && out.content_range().is_none() {
            self.ignores_ranges.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(endpoint = %self.endpoint, "the S3 server ignores Range; reading whole objects instead");
            return Err(ignores_ranges(&self.endpoint));
        }
        let body =
            out.body.collect().await.map_err(|e| StoreError::Transient(format!("GET {key}: body cut short: {e}")))?;
        Ok(body.into_bytes())
    }

    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> StoreResult<()> {
        self.put_body(key, ByteStream::from(body), mode, None).await
    }

    /// CopyObject: the bytes stay in the store. A create-if-absent copy
    /// checks the name with a HEAD first (CopyObject takes no
    /// `If-None-Match` everywhere): the names copied to are fresh ones of
    /// one writer, which no one else writes.
    async fn copy(&self, from: &str, to: &str, mode: PutMode) -> StoreResult<()> {
        if mode == PutMode::IfAbsent && self.head(to).await?.is_some() {
            return Err(StoreError::PreconditionFailed(to.to_string()));
        }
        let source = format!("{}/{}", self.bucket, copy_source_path(from));
        let req = self.client.copy_object().bucket(&self.bucket).key(to).copy_source(source);
        match req.send().await {
            Ok(out) => {
                self.answered();
                // The copy must be as young as it is: compaction takes an
                // unnamed chunk object for garbage by its age, and some
                // servers have kept the source's time on a copy. One that
                // says no time, or one well before now, is not used (the
                // caller copies through itself instead).
                let stamped = out.copy_object_result().and_then(|r| r.last_modified()).map(|t| t.secs());
                let now = crate::clock::Clock::now_unix(&crate::clock::SystemClock);
                match stamped {
                    Some(t) if t >= now - COPY_FRESH_SECS => Ok(()),
                    other => Err(StoreError::Unsupported(format!(
                        "COPY {from} to {to}: the copy is stamped {} (now {now}): not a fresh object",
                        other.map_or_else(|| "with no time".to_string(), |t| t.to_string())
                    ))),
                }
            }
            // The source missing answers 404 as a missing key does.
            Err(e) => Err(match self.map_err("COPY", to, e) {
                StoreError::NotFound(_) => StoreError::NotFound(from.to_string()),
                other => other,
            }),
        }
    }

    async fn get_tagged(&self, key: &str) -> StoreResult<(Bytes, String)> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.map_err("GET", key, e))?;
        self.answered();
        let Some(tag) = out.e_tag().map(str::to_string) else {
            return Err(StoreError::Unsupported(format!("GET {key}: {} answered no ETag", self.endpoint)));
        };
        let body =
            out.body.collect().await.map_err(|e| StoreError::Transient(format!("GET {key}: body cut short: {e}")))?;
        Ok((body.into_bytes(), tag))
    }

    async fn put_if_match(&self, key: &str, body: Bytes, tag: &str) -> StoreResult<()> {
        let req = self.client.put_object().bucket(&self.bucket).key(key).body(ByteStream::from(body)).if_match(tag);
        req.send().await.map_err(|e| self.map_err("PUT (If-Match)", key, e))?;
        self.answered();
        Ok(())
    }

    async fn put_parts(&self, key: &str, parts: Vec<Bytes>, mode: PutMode) -> StoreResult<()> {
        // A body of parts goes unsigned (its SHA-256 is not in the
        // signature): with request checksums "when required" nothing else
        // would let the server check it, so it carries its MD5.
        let md5 = (self.checksums == ChecksumMode::WhenRequired).then(|| {
            let mut h = md5::Md5::new();
            for p in &parts {
                h.update(p);
            }
            aws_smithy_types::base64::encode(h.finalize())
        });
        let body = SdkBody::retryable(move || SdkBody::from_body_1_x(PartsBody::new(parts.clone())));
        self.put_body(key, ByteStream::new(body), mode, md5).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        match self.client.delete_object().bucket(&self.bucket).key(key).send().await {
            Ok(_) => Ok(()),
            Err(e) => match self.map_err("DELETE", key, e) {
                StoreError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn list(&self, req: ListRequest<'_>) -> StoreResult<ListPage> {
        let max = if req.max_keys == 0 { 1000 } else { req.max_keys.min(1000) };
        let mut call = self.client.list_objects_v2().bucket(&self.bucket).prefix(req.prefix).max_keys(max as i32);
        if let Some(after) = req.start_after {
            call = call.start_after(after);
        }
        if req.delimiter {
            call = call.delimiter("/");
        }
        let out = call.send().await.map_err(|e| self.map_err("LIST", req.prefix, e))?;
        self.answered();
        let objects: Vec<ObjectInfo> = out
            .contents()
            .iter()
            .filter_map(|o| {
                Some(ObjectInfo {
                    key: o.key()?.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    modified_unix: o.last_modified().map(|t| t.secs()),
                })
            })
            .collect();
        let common_prefixes: Vec<String> =
            out.common_prefixes().iter().filter_map(|p| p.prefix().map(str::to_string)).collect();
        let next_start_after = if out.is_truncated().unwrap_or(false) {
            let last_obj = objects.last().map(|o| o.key.clone());
            let last_prefix = common_prefixes.last().map(|p| format!("{p}\u{10ffff}"));
            last_obj.into_iter().chain(last_prefix).max()
        } else {
            None
        };
        Ok(ListPage { objects, common_prefixes, next_start_after })
    }

    async fn head(&self, key: &str) -> StoreResult<Option<u64>> {
        match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(out) => Ok(Some(out.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) => match self.map_err("HEAD", key, e) {
                StoreError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    fn describe(&self) -> String {
        format!("s3://{}", self.bucket)
    }
}

#[cfg(test)]
mod tests {
    use super::S3Settings;

    #[test]
    fn debug_output_hides_the_credentials() {
        let s = S3Settings {
            endpoint: Some("http://s3.example".into()),
            region: None,
            credentials: Some(("AKIDDEBUGTEST".into(), "debug-secret-value".into())),
        };
        let text = format!("{s:?}");
        assert!(!text.contains("AKIDDEBUGTEST") && !text.contains("debug-secret-value"), "{text}");
        assert!(text.contains("http://s3.example"), "{text}");
    }
}
