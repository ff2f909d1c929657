//! s3blk: block volumes stored as chunk objects under an S3 prefix, served
//! over NBD and through a Kubernetes CSI driver.

pub mod attach;
pub mod cli;
pub mod clock;
pub mod controller;
pub mod crypto;
pub mod csi;
pub mod error;
pub mod location;
pub mod metrics;
pub mod nbd;
pub mod size;
pub mod store;
pub mod volume;
