//! Mapping of engine errors to what each front end speaks: NBD errnos now,
//! gRPC status codes for the CSI services.

use crate::nbd::proto;
use crate::volume::VolumeError;

/// The NBD error for a failed request.
pub fn nbd_errno(e: &VolumeError) -> u32 {
    match e {
        VolumeError::OutOfRange { .. } | VolumeError::InvalidArgument(_) => proto::EINVAL,
        VolumeError::ReadOnly => proto::EPERM,
        VolumeError::Fenced(_) => proto::ESHUTDOWN,
        VolumeError::LocalLog { no_space: true, .. } => proto::ENOSPC,
        VolumeError::LocalLog { no_space: false, .. } => proto::EIO,
        VolumeError::NotFound(_)
        | VolumeError::AlreadyExists(_)
        | VolumeError::Corrupt(_)
        | VolumeError::NoConditionalWrites
        | VolumeError::Key(_)
        | VolumeError::Store(_) => proto::EIO,
    }
}
