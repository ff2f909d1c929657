//! The client side of the NBD handshake (fixed newstyle, `NBD_OPT_GO`),
//! blocking, for the socket the kernel will take over.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::AttachError;
use crate::nbd::proto;

pub struct Connected {
    pub stream: UnixStream,
    pub size: u64,
    pub flags: u16,
}

pub fn client(socket: &Path, export: &str) -> Result<Connected, AttachError> {
    let err = |e: String| AttachError::Handshake(socket.display().to_string(), e);
    let io = |e: std::io::Error| err(e.to_string());
    let mut s = UnixStream::connect(socket).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(30))).map_err(io)?;
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).map_err(io)?;
    if greeting[..8] != proto::NBDMAGIC.to_be_bytes() || greeting[8..16] != proto::IHAVEOPT.to_be_bytes() {
        return Err(err("not an NBD server (bad greeting)".into()));
    }
    let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    if server_flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(err("server does not speak fixed newstyle".into()));
    }
    let mut client_flags = proto::FLAG_C_FIXED_NEWSTYLE;
    if server_flags & proto::FLAG_NO_ZEROES != 0 {
        client_flags |= proto::FLAG_C_NO_ZEROES;
    }
    s.write_all(&client_flags.to_be_bytes()).map_err(io)?;
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    let mut opt = proto::IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
    opt.extend_from_slice(&data);
    s.write_all(&opt).map_err(io)?;
    let mut export_info = None;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).map_err(io)?;
        let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
        if len > proto::MAX_OPTION_LEN {
            return Err(err(format!("option reply of {len} bytes")));
        }
        let mut body = vec![0u8; len as usize];
        s.read_exact(&mut body).map_err(io)?;
        match kind {
            proto::REP_INFO if body.len() >= 12 && body[..2] == proto::INFO_EXPORT.to_be_bytes() => {
                let mut sz = [0u8; 8];
                sz.copy_from_slice(&body[2..10]);
                export_info = Some((u64::from_be_bytes(sz), u16::from_be_bytes([body[10], body[11]])));
            }
            proto::REP_INFO => {}
            proto::REP_ACK => break,
            other => {
                return Err(err(format!(
                    "export {export:?} refused (reply {other:#x}: {})",
                    String::from_utf8_lossy(&body)
                )));
            }
        }
    }
    let (size, flags) = export_info.ok_or_else(|| err("server sent no export information".into()))?;
    s.set_read_timeout(None).map_err(io)?;
    Ok(Connected { stream: s, size, flags })
}
