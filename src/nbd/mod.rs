//! The embedded NBD server: a pure protocol codec, the per-connection
//! session, and the listener.

pub mod proto;
pub mod server;
pub mod session;

pub use server::{Listen, serve};
pub use session::Export;
