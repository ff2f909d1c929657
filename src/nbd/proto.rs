//! The NBD wire protocol (fixed newstyle), as a pure codec: bytes in,
//! frames out, no I/O. Parsers are incremental (`Ok(None)` = need more
//! bytes) and never allocate more than the bytes they were given plus a
//! fixed bound, whatever a length field claims.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_ROTATIONAL: u16 = 1 << 4;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// The one metadata context offered, and the id it gets.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// Structured reply chunk types.
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

// Errors (Linux errno values, as the protocol defines them).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest option payload we accept (names, info requests). Anything
/// bigger is refused without reading it into memory first.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Largest READ/WRITE payload (the maximum block size we advertise).
pub const MAX_PAYLOAD: u32 = 32 << 20;
pub const REQUEST_HEADER_LEN: usize = 28;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("option {option} has {len} bytes, more than the {MAX_OPTION_LEN} accepted")]
    OptionTooLong { option: u32, len: u32 },
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The server's greeting: magic, IHAVEOPT, handshake flags.
pub fn server_greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// One option sent by the client during haggling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawOption {
    pub code: u32,
    pub data: Vec<u8>,
}

/// Parse one option frame from the front of `buf`; returns it and the bytes used.
pub fn parse_option(buf: &[u8]) -> Result<Option<(RawOption, usize)>, ProtoError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let magic = be_u64(buf);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    let code = be_u32(&buf[8..]);
    let len = be_u32(&buf[12..]);
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::OptionTooLong { option: code, len });
    }
    let total = 16 + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((RawOption { code, data: buf[16..total].to_vec() }, total)))
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: Vec<u8>,
    pub requests: Vec<u16>,
}

/// `None` when the payload's lengths do not add up (reply `NBD_REP_ERR_INVALID`).
pub fn parse_info_request(data: &[u8]) -> Option<InfoRequest> {
    if data.len() < 4 {
        return None;
    }
    let nlen = be_u32(data) as usize;
    let rest = data.get(4..)?;
    let name = rest.get(..nlen)?.to_vec();
    let rest = &rest[nlen..];
    if rest.len() < 2 {
        return None;
    }
    let n = be_u16(rest) as usize;
    let rest = &rest[2..];
    if rest.len() != n * 2 {
        return None;
    }
    let requests = rest.chunks_exact(2).map(be_u16).collect();
    Some(InfoRequest { name, requests })
}

/// An option reply frame.
/// A LIST_META_CONTEXT / SET_META_CONTEXT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: Vec<u8>,
    pub queries: Vec<Vec<u8>>,
}

/// Parse `u32 name length, name, u32 query count, (u32 length, query)*`;
/// `None` when malformed (lengths past the end, bytes left over).
pub fn parse_meta_context_request(data: &[u8]) -> Option<MetaContextRequest> {
    fn take(rest: &mut &[u8]) -> Option<Vec<u8>> {
        let n = be_u32(rest.get(..4)?) as usize;
        let v = rest.get(4..4usize.checked_add(n)?)?.to_vec();
        *rest = &rest[4 + n..];
        Some(v)
    }
    let mut rest = data;
    let export = take(&mut rest)?;
    let count = be_u32(rest.get(..4)?) as usize;
    rest = &rest[4..];
    // Each query takes at least its 4-byte length.
    if count > rest.len() / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(take(&mut rest)?);
    }
    rest.is_empty().then_some(MetaContextRequest { export, queries })
}

/// A REP_META_CONTEXT payload: the context's id and name.
pub fn meta_context_reply(id: u32, name: &str) -> Vec<u8> {
    let mut d = id.to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

pub fn info_text(kind: u16, text: &[u8]) -> Vec<u8> {
    let mut d = kind.to_be_bytes().to_vec();
    d.extend_from_slice(text);
    d
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, preferred, max] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    d
}

/// `NBD_REP_SERVER` payload for `NBD_OPT_LIST`.
pub fn list_entry(name: &[u8], description: &[u8]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(description);
    d
}

/// Reply to `NBD_OPT_EXPORT_NAME`: size and flags, no 124 zero bytes (NO_ZEROES).
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut d = size.to_be_bytes().to_vec();
    d.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        d.extend_from_slice(&[0u8; 124]);
    }
    d
}

/// A transmission-phase request header (the WRITE payload follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, ProtoError> {
    if buf.len() < REQUEST_HEADER_LEN {
        return Ok(None);
    }
    let magic = be_u32(buf);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic(magic as u64));
    }
    Ok(Some(Request {
        flags: be_u16(&buf[4..]),
        kind: be_u16(&buf[6..]),
        handle: be_u64(&buf[8..]),
        offset: be_u64(&buf[16..]),
        length: be_u32(&buf[24..]),
    }))
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_HEADER_LEN] {
    let mut out = [0u8; REQUEST_HEADER_LEN];
    out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&r.flags.to_be_bytes());
    out[6..8].copy_from_slice(&r.kind.to_be_bytes());
    out[8..16].copy_from_slice(&r.handle.to_be_bytes());
    out[16..24].copy_from_slice(&r.offset.to_be_bytes());
    out[24..].copy_from_slice(&r.length.to_be_bytes());
    out
}

/// Simple reply header (READ data follows on success).
pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&handle.to_be_bytes());
    out
}

/// Structured reply chunk header; `payload_len` bytes of payload follow.
pub fn structured_header(flags: u16, kind: u16, handle: u64, payload_len: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..].copy_from_slice(&payload_len.to_be_bytes());
    out
}

/// A structured error chunk (always the last: DONE set).
pub fn structured_error(handle: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    let mut out = structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6 + msg.len() as u32).to_vec();
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// Split a READ result into data and hole pieces at `granule` boundaries
/// (relative to the request offset): runs of all-zero granules become holes,
/// so sparse regions cost no bytes on the wire.
pub fn split_holes(data: &[u8], granule: usize, is_zero: impl Fn(&[u8]) -> bool) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    let granule = granule.max(1);
    let mut pos = 0;
    while pos < data.len() {
        let end = (pos + granule).min(data.len());
        let hole = is_zero(&data[pos..end]);
        match out.last_mut() {
            Some((_, len, h)) if *h == hole => *len += end - pos,
            _ => out.push((pos, end - pos, hole)),
        }
        pos = end;
    }
    out
}

/// Fuzz entry point: run every parser over arbitrary bytes. It must never
/// panic and never allocate more than a small multiple of the input.
pub fn fuzz_one(data: &[u8]) {
    let mut rest = data;
    while let Ok(Some((opt, used))) = parse_option(rest) {
        let _ = parse_info_request(&opt.data);
        rest = &rest[used..];
    }
    let _ = parse_info_request(data);
    let mut rest = data;
    while let Ok(Some(r)) = parse_request(rest) {
        let _ = encode_request(&r);
        rest = &rest[REQUEST_HEADER_LEN..];
    }
    let _ = split_holes(data, 1 + data.first().copied().unwrap_or(0) as usize, |b| b.iter().all(|&x| x == 0));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            fuzz_one(&data);
        }

        #[test]
        fn framed_options_with_arbitrary_payloads_parse_back(code in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let frame = opt(code, &data);
            let (o, used) = parse_option(&frame).unwrap().unwrap();
            prop_assert_eq!(used, frame.len());
            prop_assert_eq!(o, RawOption { code, data });
        }
    }

    fn opt(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn options_parse_incrementally() {
        let frame = opt(OPT_GO, b"abcd");
        for cut in 0..frame.len() {
            assert_eq!(parse_option(&frame[..cut]).unwrap(), None);
        }
        let (o, used) = parse_option(&frame).unwrap().unwrap();
        assert_eq!((o.code, o.data.as_slice(), used), (OPT_GO, &b"abcd"[..], frame.len()));
    }

    #[test]
    fn giant_option_length_is_refused_before_reading() {
        let mut frame = IHAVEOPT.to_be_bytes().to_vec();
        frame.extend_from_slice(&OPT_GO.to_be_bytes());
        frame.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(parse_option(&frame), Err(ProtoError::OptionTooLong { .. })));
    }

    #[test]
    fn info_requests_parse_and_reject_bad_lengths() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Some(InfoRequest { name: b"vol".to_vec(), requests: vec![INFO_BLOCK_SIZE, INFO_NAME] })
        );
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None);
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(b"x");
        assert_eq!(parse_info_request(&huge), None);
    }

    #[test]
    fn requests_round_trip() {
        let r = Request { flags: CMD_FLAG_FUA, kind: CMD_WRITE, handle: 0xdead, offset: 1 << 40, length: 4096 };
        let b = encode_request(&r);
        assert_eq!(parse_request(&b[..27]).unwrap(), None);
        assert_eq!(parse_request(&b).unwrap(), Some(r));
        let mut bad = b;
        bad[0] ^= 1;
        assert!(parse_request(&bad).is_err());
    }

    #[test]
    fn holes_are_split_at_granules() {
        let mut d = vec![0u8; 4096 * 4];
        d[4096] = 1;
        let v = split_holes(&d, 4096, |b| b.iter().all(|&x| x == 0));
        assert_eq!(v, vec![(0, 4096, true), (4096, 4096, false), (8192, 8192, true)]);
    }
}
