//! Volume URLs: `s3://bucket/prefix/name`, `file:///dir/name`, or a plain
//! directory path (the embedded local store).

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::store::retry::RetryPolicy;
use crate::store::{DynStore, StoreError, local::LocalStore, s3::S3Store};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    S3 {
        bucket: String,
    },
    Local {
        root: PathBuf,
    },
    /// In-process memory (`memory://name`): gone when the process exits.
    /// For benchmarks and experiments only.
    Memory,
}

/// A volume: which store, and the key prefix of the volume inside it
/// (empty for a store root, else ends with `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub store: StoreSpec,
    pub prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid volume URL {url:?}: {reason}")]
pub struct LocationError {
    pub url: String,
    pub reason: String,
}

fn bad(url: &str, reason: &str) -> LocationError {
    LocationError { url: url.to_string(), reason: reason.to_string() }
}

fn clean_prefix(url: &str, path: &str) -> Result<String, LocationError> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(bad(url, "'.' and '..' are not allowed in object prefixes"));
    }
    Ok(parts.iter().map(|p| format!("{p}/")).collect())
}

impl Location {
    /// Parse a volume URL; `need_name` requires a volume name (not a bare store).
    pub fn parse(url: &str, need_name: bool) -> Result<Location, LocationError> {
        if url.is_empty() {
            return Err(bad(url, "empty"));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad(url, "no bucket"));
            }
            let prefix = clean_prefix(url, path)?;
            if need_name && prefix.is_empty() {
                return Err(bad(url, "no volume name after the bucket (s3://bucket/prefix/name)"));
            }
            return Ok(Location { store: StoreSpec::S3 { bucket: bucket.to_string() }, prefix });
        }
        if let Some(rest) = url.strip_prefix("memory://") {
            let prefix = clean_prefix(url, rest)?;
            if need_name && prefix.is_empty() {
                return Err(bad(url, "no volume name (memory://name)"));
            }
            return Ok(Location { store: StoreSpec::Memory, prefix });
        }
        // Anything that looks like a URL but is none of the above is a
        // mistake (`s3:/bucket/x`, `S3://…`, `file:/x`), not a local path.
        let scheme = url.split_once(':').map(|(s, _)| s).filter(|s| {
            s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && s.chars().all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
        });
        if let Some(scheme) = scheme {
            let lower = scheme.to_ascii_lowercase();
            let known = ["s3", "file", "memory"].contains(&lower.as_str());
            let rest = &url[scheme.len() + 1..];
            if (rest.starts_with('/') || known) && !(lower == "file" && scheme == "file" && rest.starts_with("//")) {
                let hint = match lower.as_str() {
                    "s3" => "S3 volume URLs are s3://bucket/prefix/name",
                    "file" => "file URLs are file:///absolute/dir/name",
                    "memory" => "memory URLs are memory://name",
                    _ => "use s3://, file:// or a path",
                };
                return Err(bad(url, &format!("not a valid URL ({hint})")));
            }
        }
        let path = match url.strip_prefix("file://") {
            Some(p) if p.starts_with('/') => PathBuf::from(p),
            Some(_) => {
                return Err(bad(url, "file URLs need an absolute path (file:///dir/name)"));
            }
            None if url.contains("://") => {
                return Err(bad(url, "unknown scheme (use s3://, file:// or a path)"));
            }
            None => PathBuf::from(url),
        };
        let path = normalize(&path);
        if !need_name {
            return Ok(Location { store: StoreSpec::Local { root: path }, prefix: String::new() });
        }
        let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| bad(url, "no volume name"))?;
        let root = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        let root = if root.as_os_str().is_empty() { PathBuf::from(".") } else { root };
        Ok(Location { store: StoreSpec::Local { root }, prefix: format!("{name}/") })
    }

    /// A child volume (or other prefix) in the same store.
    pub fn child(&self, name: &str) -> Location {
        Location { store: self.store.clone(), prefix: format!("{}{name}/", self.prefix) }
    }

    /// The canonical URL, parseable again by [`Location::parse`]: used as
    /// the CSI volume id, so the driver needs no state of its own.
    pub fn url(&self) -> String {
        let name = self.prefix.trim_end_matches('/');
        match &self.store {
            StoreSpec::S3 { bucket } => format!("s3://{bucket}/{name}"),
            StoreSpec::Local { root } => {
                let abs = std::path::absolute(root).unwrap_or_else(|_| root.clone());
                format!("file://{}", normalize(&abs.join(name)).display())
            }
            StoreSpec::Memory => format!("memory://{name}"),
        }
    }

    pub fn display(&self) -> String {
        match &self.store {
            StoreSpec::S3 { bucket } => {
                format!("s3://{bucket}/{}", self.prefix.trim_end_matches('/'))
            }
            StoreSpec::Local { root } => root.join(self.prefix.trim_end_matches('/')).display().to_string(),
            StoreSpec::Memory => format!("memory://{}", self.prefix.trim_end_matches('/')),
        }
    }
}

fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() { PathBuf::from(".") } else { out }
}

/// Connect to a store, wrapped in the retry layer. A local store's
/// directory is created (`volume create`); see [`open_existing_store`].
pub async fn open_store(spec: &StoreSpec, policy: RetryPolicy) -> Result<DynStore, StoreError> {
    open(spec, policy, true).await
}

/// Like [`open_store`], but a local store's directory must exist: commands
/// that only read, or act on an existing volume, create nothing.
pub async fn open_existing_store(spec: &StoreSpec, policy: RetryPolicy) -> Result<DynStore, StoreError> {
    open(spec, policy, false).await
}

async fn open(spec: &StoreSpec, policy: RetryPolicy, create: bool) -> Result<DynStore, StoreError> {
    let base: DynStore = match spec {
        StoreSpec::S3 { bucket } => Arc::new(S3Store::from_env(bucket).await?),
        StoreSpec::Local { root } if !create && !root.is_dir() => {
            return Err(StoreError::NotFound(format!("directory {} does not exist", root.display())));
        }
        StoreSpec::Local { root } => Arc::new(LocalStore::new(root)?),
        StoreSpec::Memory => Arc::new(crate::store::memory::MemoryStore::new()),
    };
    Ok(crate::store::layered(base, policy))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        let l = Location::parse("s3://b/p/q/vol", true).unwrap();
        assert_eq!(l.store, StoreSpec::S3 { bucket: "b".into() });
        assert_eq!(l.prefix, "p/q/vol/");
        let l = Location::parse("file:///data/vols/v1", true).unwrap();
        assert_eq!(l.store, StoreSpec::Local { root: "/data/vols".into() });
        assert_eq!(l.prefix, "v1/");
        let l = Location::parse("./demo-volume", true).unwrap();
        assert_eq!(l.store, StoreSpec::Local { root: ".".into() });
        assert_eq!(l.prefix, "demo-volume/");
        let l = Location::parse("s3://b", false).unwrap();
        assert_eq!(l.prefix, "");
    }

    #[test]
    fn rejects_bad_urls() {
        assert_eq!(Location::parse("memory://bench", true).unwrap().store, StoreSpec::Memory);
        for u in ["", "s3://", "s3://b", "s3://b/../x", "http://x/y", "file://rel/x", "memory://"] {
            assert!(Location::parse(u, true).is_err(), "{u} accepted");
        }
        // Mistyped URLs are errors, never local paths.
        for u in ["s3:/x/y", "s3:bucket/y", "S3://b/v", "file:/tmp/x", "memory:x", "https:/b/v", "gs:/b/v"] {
            let e = Location::parse(u, true).expect_err(u);
            assert!(e.reason.contains("not a valid URL"), "{u}: {e}");
        }
        // Paths with a colon that are not URL-like stay paths.
        for u in ["./a:b/v", "a:b", "dir/x:y"] {
            assert!(matches!(Location::parse(u, true), Ok(Location { store: StoreSpec::Local { .. }, .. })), "{u}");
        }
    }
}
