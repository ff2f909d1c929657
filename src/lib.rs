//! s3blk: block volumes stored as chunk objects under an S3 prefix, served
//! over NBD and through a Kubernetes CSI driver.

pub mod attach;
pub mod cli;
pub mod clock;
pub mod controller;
/// Keys and sealed frames of encrypted volumes (`crates/crypto`).
pub use s3blk_crypto as crypto;
pub mod csi;
pub mod error;
pub mod location;
pub mod metrics;
pub mod nbd;
pub mod size;
pub mod store;
pub mod volume;
