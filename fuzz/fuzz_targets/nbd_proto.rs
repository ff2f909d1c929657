#![no_main]
//! `cargo fuzz run nbd_proto`: the NBD codec over arbitrary bytes. Inputs
//! that ever crashed belong in `corpus/nbd_proto/`, which the normal test
//! suite replays.

#[allow(dead_code)]
#[path = "../../src/nbd/proto.rs"]
mod proto;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    proto::fuzz_one(data);
});
