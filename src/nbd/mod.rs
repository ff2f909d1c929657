//! The embedded NBD server: a pure protocol codec, the per-connection
//! session, and the listener.

pub mod client;
pub mod proto;
pub mod server;
pub mod session;
pub mod tls;
pub mod unflushed;

pub use server::{Listen, serve};
pub use session::Export;

/// A client-chosen string made safe to log: control characters (escape
/// sequences, newlines) are escaped, and it is cut to 256 characters.
pub fn printable(raw: &[u8]) -> String {
    const MAX: usize = 256;
    let text = String::from_utf8_lossy(raw);
    let mut out: String = text.chars().take(MAX).flat_map(char::escape_default).collect();
    if text.chars().count() > MAX {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn client_strings_cannot_forge_log_lines() {
        let forged = b"x\n2026-01-01 WARN volume fenced \x1b[31m";
        let p = super::printable(forged);
        assert!(!p.contains('\n') && !p.contains('\x1b'), "{p}");
        assert!(super::printable(&[b'a'; 70_000]).len() < 300);
    }
}
