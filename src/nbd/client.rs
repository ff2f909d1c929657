//! Just enough of an NBD client to ask a running server to flush an
//! export: the node plugin's preStop hook (`s3blk csi-flush`) uses it to
//! make every staged volume durable before the pod is stopped. The server
//! advertises CAN_MULTI_CONN, so a FLUSH on this extra connection covers
//! the writes the kernel acknowledged on its own connection.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use super::proto;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not an NBD server: {0}")]
    Protocol(String),
    #[error("the server has no export {0:?}")]
    NoExport(String),
    #[error("the server refused the export {name:?} (option reply {code:#x})")]
    Refused { name: String, code: u32 },
    #[error("the flush failed on the server (error {0}): the volume's unflushed writes are not durable")]
    FlushFailed(u32),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Connect to the unix socket at `path`, open `export` and flush it;
/// everything within `limit`.
pub async fn flush_unix(path: &Path, export: &str, limit: Duration) -> Result<(), ClientError> {
    let work = async {
        let stream = UnixStream::connect(path).await?;
        flush(stream, export).await
    };
    tokio::time::timeout(limit, work).await.map_err(|_| ClientError::Timeout(limit))?
}

/// Handshake (fixed newstyle, NBD_OPT_GO), one FLUSH, then a clean
/// disconnect.
pub async fn flush<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, export: &str) -> Result<(), ClientError> {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await?;
    if greeting[..8] != proto::NBDMAGIC.to_be_bytes() || greeting[8..16] != proto::IHAVEOPT.to_be_bytes() {
        return Err(ClientError::Protocol("unexpected greeting".into()));
    }
    let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    if server_flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::Protocol("the server does not speak fixed newstyle".into()));
    }
    let mut client_flags = proto::FLAG_C_FIXED_NEWSTYLE;
    if server_flags & proto::FLAG_NO_ZEROES != 0 {
        client_flags |= proto::FLAG_C_NO_ZEROES;
    }
    s.write_all(&client_flags.to_be_bytes()).await?;

    let mut data = Vec::with_capacity(export.len() + 6);
    data.extend_from_slice(
        &u32::try_from(export.len()).map_err(|_| ClientError::NoExport(export.into()))?.to_be_bytes(),
    );
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    let mut opt = Vec::with_capacity(16 + data.len());
    opt.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
    opt.extend_from_slice(&data);
    s.write_all(&opt).await?;

    let mut flags = 0u16;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await?;
        if h[..8] != proto::REPLY_MAGIC.to_be_bytes() {
            return Err(ClientError::Protocol("bad option reply magic".into()));
        }
        let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
        if len > 64 << 10 {
            return Err(ClientError::Protocol(format!("option reply of {len} bytes")));
        }
        let mut body = vec![0u8; len as usize];
        s.read_exact(&mut body).await?;
        match kind {
            proto::REP_INFO if body.len() >= 12 && u16::from_be_bytes([body[0], body[1]]) == proto::INFO_EXPORT => {
                flags = u16::from_be_bytes([body[10], body[11]]);
            }
            proto::REP_INFO => {}
            proto::REP_ACK => break,
            proto::REP_ERR_UNKNOWN => return Err(ClientError::NoExport(export.into())),
            code => return Err(ClientError::Refused { name: export.into(), code }),
        }
    }
    if flags & proto::TF_READ_ONLY != 0 || flags & proto::TF_SEND_FLUSH == 0 {
        // Nothing this connection could flush: a read-only export holds no
        // writes.
        return disconnect(&mut s).await;
    }

    s.write_all(&request(proto::CMD_FLUSH, 1)).await?;
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).await?;
    if reply[..4] != proto::SIMPLE_REPLY_MAGIC.to_be_bytes() {
        return Err(ClientError::Protocol("bad reply magic".into()));
    }
    let error = u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]);
    if u64::from_be_bytes([reply[8], reply[9], reply[10], reply[11], reply[12], reply[13], reply[14], reply[15]]) != 1 {
        return Err(ClientError::Protocol("reply to a request never sent".into()));
    }
    if error != 0 {
        return Err(ClientError::FlushFailed(error));
    }
    disconnect(&mut s).await
}

fn request(command: u16, cookie: u64) -> [u8; 28] {
    let mut r = [0u8; 28];
    r[..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
    r[6..8].copy_from_slice(&command.to_be_bytes());
    r[8..16].copy_from_slice(&cookie.to_be_bytes());
    r
}

async fn disconnect<S: AsyncWrite + Unpin>(s: &mut S) -> Result<(), ClientError> {
    // The server may already have closed its end: a failed goodbye is fine.
    let _ = s.write_all(&request(proto::CMD_DISC, 2)).await;
    let _ = s.shutdown().await;
    Ok(())
}
