//! Encrypted volumes: the data key `volume.json` keeps wrapped, unlocking
//! a store for a volume (and the parents it reads through), the tags of
//! records kept in the clear, and key rotation.
//!
//! Owns: what a volume's `encryption` field says and how it is checked,
//! the errors a user sees for a missing or wrong key. Does not own the
//! ciphers (`crypto`) or the sealing of objects (`store::sealed`).
//!
//! A volume's data key is drawn at create and never changes; a clone
//! shares its parent's (it reads the parent's chunks), wrapped again for
//! itself. Rotating the key-encryption key (`rekey`) rewraps the data key
//! in `volume.json`: no data is rewritten.

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;

use super::format::{self, Encryption, SnapshotRecord, VolumeMeta};
use super::replay;
use super::{VolumeError, VolumeResult};
use crate::crypto::{DataKey, Kek};
use crate::store::sealed::{SealedStore, Unlocked};
use crate::store::{self, DynStore, ObjectStore, PutMode, StoreError};

/// What to do about a missing key, as a user reads it.
pub const KEY_HINT: &str =
    "give its key with --key-file or S3BLK_KEY_FILE, or in Kubernetes as encryptionKey in the StorageClass's secret";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn describe(store: &dyn ObjectStore, vol: &str) -> String {
    format!("{}/{vol}", store.describe())
}

/// A new volume's keys: its data key (drawn for it, or its parent's) and
/// the key that wraps it.
#[derive(Debug, Clone)]
pub struct NewKeys {
    pub kek: Kek,
    pub data: DataKey,
}

impl NewKeys {
    /// Keys for a volume of its own: a fresh data key.
    pub fn fresh(kek: Kek) -> NewKeys {
        NewKeys { kek, data: DataKey::generate() }
    }

    /// The keys a volume made from one `store` seals (a clone, a restore)
    /// takes: the same data key and key.
    pub fn inherited(store: &dyn ObjectStore) -> Option<NewKeys> {
        store.unlocked().map(|s| NewKeys { kek: s.keys.kek.clone(), data: s.keys.data.clone() })
    }
}

/// The tag over `meta`'s fields other than its encryption: a changed size,
/// chunk size or parent is found before anything is read through it.
fn meta_tag(meta: &VolumeMeta, data: &DataKey) -> String {
    let parent = meta.parent.as_ref().map(|p| format!("{}\n{}\n{}", p.volume, p.snapshot, p.seq)).unwrap_or_default();
    let compression = meta.compression.map(|c| c.name()).unwrap_or("none");
    // Only when there (volumes sealed before it existed keep their tags).
    let flattened = meta
        .flattened
        .as_ref()
        .map(|f| format!("flattened\n{}\n{}\n{}\n{}", f.parent.volume, f.parent.snapshot, f.parent.seq, f.seq));
    let (version, size, chunk_size) =
        (meta.format_version.to_le_bytes(), meta.size.to_le_bytes(), meta.chunk_size.to_le_bytes());
    let (block_size, created, single) =
        (meta.block_size.to_le_bytes(), meta.created_unix.to_le_bytes(), [meta.single_writer as u8]);
    let mut fields: Vec<&[u8]> = vec![
        b"s3blk volume 1",
        &version,
        meta.uuid.as_bytes(),
        &size,
        &chunk_size,
        &block_size,
        meta.checksum.as_bytes(),
        &created,
        parent.as_bytes(),
        &single,
        compression.as_bytes(),
    ];
    fields.extend(flattened.as_ref().map(|f| f.as_bytes()));
    data.tag(&fields)
}

/// Make `meta` (format 6) an encrypted volume's whose data key is `data`, wrapped by `kek`.
pub fn seal_meta(meta: &mut VolumeMeta, kek: &Kek, data: &DataKey) {
    meta.format_version = meta.format_version.max(format::FORMAT_V6);
    meta.encryption = None;
    let tag = meta_tag(meta, data);
    meta.encryption = Some(Encryption {
        cipher: format::CIPHER.into(),
        key_id: kek.id(),
        data_key_id: data.id(),
        wrapped_key: B64.encode(kek.wrap(data, &meta.uuid)),
        tag,
    });
}

/// After a change of `meta`'s fields (a flatten dropping its parent): its
/// tag again, under the data key `store` unlocked. An unencrypted volume
/// has none to renew; an encrypted one reached without its key is refused.
pub fn retag(store: &dyn ObjectStore, vol: &str, meta: &mut VolumeMeta) -> VolumeResult<()> {
    if meta.encryption.is_none() {
        return Ok(());
    }
    let Some((data, uuid)) = uuid_of(store, vol) else {
        return Err(key_required(store, vol, meta));
    };
    if uuid != meta.uuid {
        return Err(VolumeError::Corrupt(format!(
            "{} volume.json names uuid {}, expected {uuid}",
            describe(store, vol),
            meta.uuid
        )));
    }
    let tag = meta_tag(meta, &data);
    if let Some(e) = &mut meta.encryption {
        e.tag = tag;
    }
    Ok(())
}

/// The data key of the encrypted volume `meta` (at `what`), unwrapped with
/// `kek`, its fields checked.
pub fn open_meta(meta: &VolumeMeta, what: &str, kek: &Kek) -> VolumeResult<DataKey> {
    let Some(e) = &meta.encryption else {
        return Err(VolumeError::InvalidArgument(format!("volume {what} is not encrypted")));
    };
    if e.key_id != kek.id() {
        return Err(VolumeError::Key(format!(
            "wrong key for volume {what}: its data key is wrapped by key {}, the key given is {}",
            e.key_id,
            kek.id()
        )));
    }
    let wrapped = B64
        .decode(e.wrapped_key.trim())
        .map_err(|err| VolumeError::Corrupt(format!("{what} volume.json: wrapped_key is not base64: {err}")))?;
    let data = kek.unwrap(&wrapped, &meta.uuid).ok_or_else(|| {
        VolumeError::Corrupt(format!(
            "{what} volume.json: its wrapped key does not open with key {} although that key wrapped it (altered)",
            kek.id()
        ))
    })?;
    check_meta(meta, what, &data)?;
    Ok(data)
}

/// `meta` is an encrypted volume's whose data key is `data`, and its fields are as written.
fn check_meta(meta: &VolumeMeta, what: &str, data: &DataKey) -> VolumeResult<()> {
    let Some(e) = &meta.encryption else {
        return Err(VolumeError::Corrupt(format!("{what} is not encrypted, but a volume that reads through it is")));
    };
    if e.data_key_id != data.id() {
        return Err(VolumeError::Corrupt(format!(
            "{what} volume.json names data key {}, expected {}",
            e.data_key_id,
            data.id()
        )));
    }
    let mut bare = meta.clone();
    bare.encryption = None;
    if meta_tag(&bare, data) != e.tag {
        return Err(VolumeError::Corrupt(format!("{what} volume.json fails its tag (its fields were altered)")));
    }
    Ok(())
}

/// Does `store` seal the objects of `vol`?
pub fn seals(store: &dyn ObjectStore, vol: &str) -> bool {
    store.unlocked().is_some_and(|s| s.volumes.iter().any(|(p, _)| p == vol))
}

/// The store in the clear under `store` (itself when it seals nothing).
pub fn base(store: &DynStore) -> DynStore {
    store.unlocked().map(|s| s.keys.base.clone()).unwrap_or_else(|| store.clone())
}

/// Refuse (with [`key_required`]) to read an encrypted volume whose
/// `volume.json` is `meta` through a store that does not seal it; through
/// one that does, `meta` (read again since the store was unlocked) must
/// still be the volume's, its fields unaltered.
pub fn require(store: &dyn ObjectStore, vol: &str, meta: &VolumeMeta) -> VolumeResult<()> {
    if let Some((data, uuid)) = uuid_of(store, vol) {
        if meta.uuid != uuid {
            return Err(VolumeError::Corrupt(format!(
                "{}: volume.json names uuid {}, the volume unlocked was {uuid}",
                describe(store, vol),
                meta.uuid
            )));
        }
        return check_meta(meta, &describe(store, vol), &data);
    }
    match meta.encryption.is_some() {
        true => Err(key_required(store, vol, meta)),
        false => Ok(()),
    }
}

/// The error for an encrypted volume asked for without its key.
pub fn key_required(store: &dyn ObjectStore, vol: &str, meta: &VolumeMeta) -> VolumeError {
    let id = meta.encryption.as_ref().map(|e| e.key_id.as_str()).unwrap_or("?");
    VolumeError::Key(format!("volume {} is encrypted (key {id}): {KEY_HINT}", describe(store, vol)))
}

/// The store through which `vol` reads and writes in the clear: `store`
/// itself when the volume is not encrypted (or `store` already seals it),
/// else a sealed store over it, unlocked with `kek` (or the key `store`
/// was unlocked with). The volume's parents must share its data key.
/// A missing or wrong key is refused here, before anything is read.
pub async fn unlock(store: &DynStore, vol: &str, kek: Option<&Kek>) -> VolumeResult<DynStore> {
    if seals(store.as_ref(), vol) {
        return Ok(store.clone());
    }
    let base = base(store);
    let meta = replay::read_meta(base.as_ref(), vol).await?;
    if meta.encryption.is_none() {
        return Ok(store.clone());
    }
    let kek = match (kek, store.unlocked()) {
        (Some(k), _) => k.clone(),
        (None, Some(s)) => s.keys.kek.clone(),
        (None, None) => return Err(key_required(base.as_ref(), vol, &meta)),
    };
    let data = open_meta(&meta, &describe(base.as_ref(), vol), &kek)?;
    unlocked_with(&base, vol, &meta, kek, data).await
}

/// A sealed store for `vol` (whose `volume.json` is `meta`) and its parents.
pub async fn unlocked_with(
    base: &DynStore,
    vol: &str,
    meta: &VolumeMeta,
    kek: Kek,
    data: DataKey,
) -> VolumeResult<DynStore> {
    let mut volumes = vec![(vol.to_string(), meta.uuid.clone())];
    let mut parent = meta.parent.clone();
    // A flattened volume reads from its own chunks from its flatten on: a
    // parent gone by then is no error here (what reads before that seq
    // says so).
    let mut flattened = meta.flattened.is_some();
    while let Some(p) = parent {
        if volumes.iter().any(|(v, _)| *v == p.volume) || volumes.len() > 64 {
            return Err(VolumeError::Corrupt(format!("{vol}: its chain of parents loops at {}", p.volume)));
        }
        let pm = match replay::read_meta(base.as_ref(), &p.volume).await {
            Err(VolumeError::NotFound(_)) if flattened => break,
            r => r?,
        };
        flattened = pm.flattened.is_some();
        check_meta(&pm, &describe(base.as_ref(), &p.volume), &data)?;
        volumes.push((p.volume.clone(), pm.uuid.clone()));
        parent = pm.parent;
    }
    let keys = Arc::new(Unlocked { base: base.clone(), kek, data });
    Ok(Arc::new(SealedStore::new(keys, volumes)))
}

/// The tag of snapshot record `rec` under `vol` (uuid `uuid`).
fn snapshot_tag(data: &DataKey, uuid: &str, rec: &SnapshotRecord) -> String {
    let token = rec.token.map(|t| t.to_string()).unwrap_or_default();
    data.tag(&[
        b"s3blk snapshot 1",
        uuid.as_bytes(),
        &rec.format_version.to_le_bytes(),
        rec.name.as_bytes(),
        &rec.seq.to_le_bytes(),
        &rec.size.to_le_bytes(),
        &rec.created_unix.to_le_bytes(),
        token.as_bytes(),
        rec.clone.as_deref().unwrap_or_default().as_bytes(),
    ])
}

fn uuid_of(store: &dyn ObjectStore, vol: &str) -> Option<(DataKey, String)> {
    let s = store.unlocked()?;
    s.volumes.into_iter().find(|(p, _)| p == vol).map(|(_, uuid)| (s.keys.data.clone(), uuid))
}

/// Tag `rec`, a snapshot record of `vol`, when `store` seals `vol`.
pub fn tag_snapshot(store: &dyn ObjectStore, vol: &str, rec: &mut SnapshotRecord) {
    rec.auth = None;
    if let Some((data, uuid)) = uuid_of(store, vol) {
        rec.auth = Some(snapshot_tag(&data, &uuid, rec));
    }
}

/// When `store` seals `vol`: `rec` (at `what`, the record of snapshot
/// `name`) is a record written for it under that name, unaltered.
pub fn check_snapshot(
    store: &dyn ObjectStore,
    vol: &str,
    name: &str,
    rec: &SnapshotRecord,
    what: &str,
) -> VolumeResult<()> {
    let Some((data, uuid)) = uuid_of(store, vol) else { return Ok(()) };
    if rec.name != name {
        return Err(VolumeError::Corrupt(format!("{what} holds the record of snapshot {:?}", rec.name)));
    }
    match &rec.auth {
        Some(t) if *t == snapshot_tag(&data, &uuid, rec) => Ok(()),
        Some(_) => Err(VolumeError::Corrupt(format!("{what} fails its tag (altered, or another volume's)"))),
        None => Err(VolumeError::Corrupt(format!("{what} has no tag, but its volume is encrypted"))),
    }
}

/// How often a change of `volume.json` reads it again and goes again when
/// another change landed between its read and its write.
const META_ATTEMPTS: usize = 8;

/// What [`replace_meta`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replaced {
    Done,
    /// Another change landed since `volume.json` was read: nothing was
    /// written; read it again and go again.
    Changed,
}

/// Put `meta` in place of a finished volume's `volume.json` (a rekey, a
/// flatten), only while it still is the one read with `tag`: two changes
/// at once (a rekey and a flatten's step) cannot undo one another, the
/// later one finds it changed and goes again. A store that does not do
/// conditional replaces (no tag, or [`store::supports_conditional_replace`]
/// finds it answers 501 to `If-Match` or ignores it) gets an
/// unconditional write, with a warning, and the callers' read-back.
/// Refused while the volume is being deleted or before its create
/// finished. A delete that ran meanwhile took every record and
/// checkpoint before its tombstone: what this wrote is then all that is
/// left of the volume, and goes again. One that began meanwhile and keeps
/// the volume for its clones keeps `volume.json` beside its tombstone
/// (the reaper takes it with the rest later). `doing` says, for errors,
/// what was under way.
async fn replace_meta(
    store: &DynStore,
    vol: &str,
    meta: &VolumeMeta,
    tag: Option<&str>,
    doing: &str,
) -> VolumeResult<Replaced> {
    let base = base(store);
    let what = describe(base.as_ref(), vol);
    let tombstone = super::catalog::tombstone_key(vol);
    if base.head(&tombstone).await?.is_some() {
        return Err(VolumeError::NotFound(format!("{what} (being deleted)")));
    }
    // Records or a checkpoint: a volume whose create finished (one still
    // being created, or left by a create that stopped, is not changed).
    let holds_state = || async {
        for prefix in [format::journal_prefix(vol), format::checkpoint_prefix(vol)] {
            let req = crate::store::ListRequest { prefix: &prefix, start_after: None, delimiter: false, max_keys: 1 };
            if !base.list(req).await?.objects.is_empty() {
                return Ok::<_, VolumeError>(true);
            }
        }
        Ok(false)
    };
    if !holds_state().await? {
        return Err(VolumeError::InvalidArgument(format!(
            "{what}: its create has not finished (no journal record yet); finish or delete it first"
        )));
    }
    let body = Bytes::from(meta.encode());
    let key = format::meta_key(vol);
    let deleted = || VolumeError::NotFound(format!("{what} (deleted while {doing})"));
    let tag = match tag {
        Some(t) if store::supports_conditional_replace(base.as_ref(), vol).await? => Some(t),
        _ => None,
    };
    match tag {
        Some(tag) => match base.put_if_match(&key, body.clone(), tag).await {
            Ok(()) => {}
            // Another change, or an attempt of this one that landed before
            // a retry (whose tag it then found): the bytes say which.
            Err(StoreError::PreconditionFailed(_)) => match base.get(&key, None).await {
                Ok(now) if now == body => {}
                Ok(_) => return Ok(Replaced::Changed),
                Err(StoreError::NotFound(_)) => return Err(deleted()),
                Err(e) => return Err(e.into()),
            },
            Err(StoreError::NotFound(_)) => return Err(deleted()),
            Err(e) => return Err(e.into()),
        },
        None => {
            tracing::warn!(
                volume = %what,
                "the store does not replace objects conditionally (If-Match): volume.json is rewritten \
                 unconditionally; run no other rekey or flatten of this volume at the same time"
            );
            base.put(&key, body.clone(), PutMode::Overwrite).await?;
        }
    }
    if !holds_state().await? {
        if base.get(&key, None).await.ok().as_ref() == Some(&body) {
            base.delete(&key).await?;
        }
        return Err(deleted());
    }
    if base.head(&tombstone).await?.is_some() {
        return Err(deleted());
    }
    Ok(Replaced::Done)
}

/// A pause before reading `volume.json` again after attempt `attempt`
/// found it changed: twice as long each time (20 ms, 40 ms, ...), so that
/// two changes that keep meeting drift apart. Not jittered: the
/// simulation replays a seed's timings exactly.
async fn before_again(attempt: usize) {
    tokio::time::sleep(std::time::Duration::from_millis(10 << attempt.min(8))).await;
}

/// Change `vol`'s `volume.json`: `make` gives the next one from the one
/// read (`None`: nothing to write), which replaces it only while it is
/// still the one read ([`replace_meta`]); when another change landed in
/// between, it is read again and `make` goes again on it. Returns what
/// was written. `doing` says, for errors, what was under way.
pub(crate) async fn change_meta(
    store: &DynStore,
    vol: &str,
    doing: &str,
    make: impl Fn(VolumeMeta) -> VolumeResult<Option<VolumeMeta>>,
) -> VolumeResult<Option<VolumeMeta>> {
    for attempt in 0..META_ATTEMPTS {
        if attempt > 0 {
            before_again(attempt).await;
        }
        let (meta, tag) = replay::read_meta_tagged(store.as_ref(), vol).await?;
        let Some(next) = make(meta)? else { return Ok(None) };
        if replace_meta(store, vol, &next, tag.as_deref(), doing).await? == Replaced::Done {
            return Ok(Some(next));
        }
    }
    Err(changed_again(&describe(store.as_ref(), vol), doing))
}

/// Rewrap `vol`'s data key with `new` (it was wrapped by `old`): the data
/// stays as it is, and only `new` opens the volume from then on. Returns
/// the new key's id. `volume.json` is replaced only while it is the one
/// read ([`change_meta`]): a change that landed meanwhile (a flatten's
/// step) is kept, and the rekey goes again on it. A volume that `new`
/// already opens needs nothing (a rekey run again, or one whose attempt
/// landed while its answer was lost and a flatten's step followed it).
pub async fn rekey(store: &DynStore, vol: &str, old: &Kek, new: &Kek) -> VolumeResult<String> {
    let base = base(store);
    let what = describe(base.as_ref(), vol);
    let written = change_meta(&base, vol, "its key was being changed", |meta| {
        if meta.encryption.is_none() {
            return Err(VolumeError::InvalidArgument(format!(
                "volume {what} is not encrypted: there is no key to change (an existing volume cannot be encrypted \
                 in place; copy it into an encrypted one)"
            )));
        }
        if meta.encryption.as_ref().is_some_and(|e| e.key_id == new.id()) && open_meta(&meta, &what, new).is_ok() {
            return Ok(None);
        }
        let data = open_meta(&meta, &what, old)?;
        let mut next = meta;
        next.encryption = None;
        seal_meta(&mut next, new, &data);
        Ok(Some(next))
    })
    .await?;
    if written.is_none() {
        return Ok(new.id());
    }
    // On a store without conditional replaces, another rekey at the same
    // moment can still have won: say so.
    let now = replay::read_meta(base.as_ref(), vol).await?;
    match now.encryption.as_ref().map(|e| e.key_id.as_str()) {
        Some(id) if id == new.id() => Ok(new.id()),
        other => Err(VolumeError::Store(crate::store::StoreError::Transient(format!(
            "{what}: volume.json names key {} after the rekey to {} (another rekey ran at the same time); check \
             with volume inspect and run it again",
            other.unwrap_or("none"),
            new.id()
        )))),
    }
}

/// The error of a change of `volume.json` that found it changed by others
/// [`META_ATTEMPTS`] times in a row.
fn changed_again(what: &str, doing: &str) -> VolumeError {
    VolumeError::Store(StoreError::Transient(format!(
        "{what}: volume.json was changed by others {META_ATTEMPTS} times while {doing}; run it again"
    )))
}
