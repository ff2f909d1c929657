//! A minimal NBD client for protocol edge cases real clients never produce.
#![allow(dead_code)]

use s3blk::nbd::proto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub struct Client {
    pub s: UnixStream,
    pub size: u64,
    pub flags: u16,
}

pub async fn send_option(s: &mut UnixStream, code: u32, data: &[u8]) {
    let mut f = proto::IHAVEOPT.to_be_bytes().to_vec();
    f.extend_from_slice(&code.to_be_bytes());
    f.extend_from_slice(&(data.len() as u32).to_be_bytes());
    f.extend_from_slice(data);
    s.write_all(&f).await.expect("send option");
}

/// Read one option reply: (option, reply type, data).
pub async fn read_option_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.expect("option reply");
    assert_eq!(u64::from_be_bytes(h[..8].try_into().expect("8")), proto::REPLY_MAGIC);
    let opt = u32::from_be_bytes(h[8..12].try_into().expect("4"));
    let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).await.expect("option data");
    (opt, kind, d)
}

/// Connect and finish the greeting; option haggling is left to the caller.
pub async fn greet(path: &std::path::Path) -> UnixStream {
    let mut s = UnixStream::connect(path).await.expect("connect");
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.expect("greeting");
    assert_eq!(&g[..8], &proto::NBDMAGIC.to_be_bytes());
    s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes()).await.expect("flags");
    s
}

pub fn go_payload(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// Finish haggling with GO; returns the client in transmission phase.
pub async fn go(mut s: UnixStream, name: &str) -> Client {
    send_option(&mut s, proto::OPT_GO, &go_payload(name)).await;
    let (mut size, mut flags) = (0, 0);
    loop {
        let (_, kind, d) = read_option_reply(&mut s).await;
        match kind {
            proto::REP_INFO if u16::from_be_bytes([d[0], d[1]]) == proto::INFO_EXPORT => {
                size = u64::from_be_bytes(d[2..10].try_into().expect("8"));
                flags = u16::from_be_bytes([d[10], d[11]]);
            }
            proto::REP_INFO => {}
            proto::REP_ACK => return Client { s, size, flags },
            other => panic!("GO failed with reply {other:#x}: {}", String::from_utf8_lossy(&d)),
        }
    }
}

impl Client {
    pub async fn connect(path: &std::path::Path, name: &str) -> Client {
        go(greet(path).await, name).await
    }

    pub async fn send(&mut self, kind: u16, flags: u16, handle: u64, offset: u64, length: u32, data: &[u8]) {
        let r = proto::Request { flags, kind, handle, offset, length };
        self.s.write_all(&proto::encode_request(&r)).await.expect("send request");
        self.s.write_all(data).await.expect("send payload");
    }

    /// Read a simple reply: (error, handle).
    pub async fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).await.expect("reply");
        assert_eq!(u32::from_be_bytes(h[..4].try_into().expect("4")), proto::SIMPLE_REPLY_MAGIC);
        (u32::from_be_bytes(h[4..8].try_into().expect("4")), u64::from_be_bytes(h[8..].try_into().expect("8")))
    }

    pub async fn read_payload(&mut self, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        self.s.read_exact(&mut d).await.expect("read data");
        d
    }

    pub async fn write(&mut self, handle: u64, offset: u64, data: &[u8]) -> u32 {
        self.send(proto::CMD_WRITE, 0, handle, offset, data.len() as u32, data).await;
        let (err, h) = self.reply().await;
        assert_eq!(h, handle);
        err
    }

    pub async fn flush(&mut self, handle: u64) -> u32 {
        self.send(proto::CMD_FLUSH, 0, handle, 0, 0, &[]).await;
        let (err, h) = self.reply().await;
        assert_eq!(h, handle);
        err
    }

    pub async fn read(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send(proto::CMD_READ, 0, handle, offset, len, &[]).await;
        let (err, h) = self.reply().await;
        assert_eq!(h, handle);
        if err != 0 {
            return Err(err);
        }
        Ok(self.read_payload(len as usize).await)
    }
}

impl Client {
    async fn try_send(&mut self, kind: u16, handle: u64, offset: u64, length: u32, data: &[u8]) -> std::io::Result<()> {
        let r = proto::Request { flags: 0, kind, handle, offset, length };
        self.s.write_all(&proto::encode_request(&r)).await?;
        self.s.write_all(data).await
    }

    async fn try_reply(&mut self, handle: u64) -> std::io::Result<u32> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).await?;
        let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        if h[..4] != proto::SIMPLE_REPLY_MAGIC.to_be_bytes() {
            return Err(bad("bad reply magic"));
        }
        if h[8..] != handle.to_be_bytes() {
            return Err(bad("reply for another handle"));
        }
        Ok(u32::from_be_bytes([h[4], h[5], h[6], h[7]]))
    }

    /// A write whose connection may die under it: `Err` when the server
    /// went away (the write may or may not have been applied).
    pub async fn try_write(&mut self, handle: u64, offset: u64, data: &[u8]) -> std::io::Result<u32> {
        self.try_send(proto::CMD_WRITE, handle, offset, data.len() as u32, data).await?;
        self.try_reply(handle).await
    }

    pub async fn try_flush(&mut self, handle: u64) -> std::io::Result<u32> {
        self.try_send(proto::CMD_FLUSH, handle, 0, 0, &[]).await?;
        self.try_reply(handle).await
    }
}
