//! Block volumes stored as chunk objects: format, engine, consistency checks.

pub mod budget;
pub mod cache;
pub mod catalog;
pub mod compact;
pub mod engine;
pub mod format;
pub mod fsck;
pub mod journal;
pub mod keys;
pub mod lease;
pub mod locks;
pub mod mapview;
pub mod replay;

pub use engine::{OpenOptions, Volume, VolumeStats};

use crate::store::StoreError;
use format::FormatError;

/// Errors of volume operations.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("I/O of {len} bytes at offset {offset} is outside the volume of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("volume is read-only")]
    ReadOnly,
    #[error("this writer was fenced: {0}; it accepts no more writes")]
    Fenced(String),
    #[error("volume data is damaged: {0}")]
    Corrupt(String),
    #[error(
        "the store does not honour conditional writes (If-None-Match), so two writers could not be fenced; pass --single-writer to accept that"
    )]
    NoConditionalWrites,
    #[error("{why}")]
    LocalLog { why: String, no_space: bool },
    /// An encrypted volume asked for without its key, or with another.
    #[error("{0}")]
    Key(String),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for VolumeError {
    fn from(e: StoreError) -> Self {
        match e {
            // An object of an encrypted volume that does not open.
            StoreError::Damaged(why) => VolumeError::Corrupt(why),
            e => VolumeError::Store(e),
        }
    }
}

impl From<FormatError> for VolumeError {
    fn from(e: FormatError) -> Self {
        match e {
            // Read without the key (what reads an encrypted volume checks
            // for its key first: `keys::require`), or damage in a volume
            // that is not encrypted.
            FormatError::Encrypted(_) => VolumeError::Corrupt(format!("{e} ({})", keys::KEY_HINT)),
            e => VolumeError::Corrupt(e.to_string()),
        }
    }
}

pub type VolumeResult<T> = Result<T, VolumeError>;
