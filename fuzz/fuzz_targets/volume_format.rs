#![no_main]
//! `cargo fuzz run volume_format`: the decoders of stored objects
//! (volume.json, snapshot records, journal records, checkpoints and their
//! parts) and of chunk objects of every layout (whole, with a table,
//! packed with lz4 or zstd) over arbitrary bytes, and the opening of
//! sealed objects and wrapped keys of encrypted volumes (`crates/crypto`).
//! Inputs that ever crashed
//! belong in `corpus/volume_format/`, which the normal test suite replays
//! with mutations (`src/volume/format.rs`).

#[allow(dead_code)]
#[path = "../../src/volume/format.rs"]
mod format;

#[allow(dead_code)]
#[path = "../../crates/crypto/src/lib.rs"]
mod crypto;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    format::fuzz_decode(data);
});
