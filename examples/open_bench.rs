//! How long opening a volume with many mapped chunks takes (issue target:
//! a 1 TiB volume of 1 MiB chunks, all 1 M mapped, opens in under 2 s on
//! moto). Run by `bench/open.sh`, which starts the S3 server.
//!
//! The volume is made as a writer leaves it after a compaction: created,
//! then a checkpoint at its head mapping every chunk (split into parts, as
//! any checkpoint of more than 131,072 chunks is). The chunk objects are
//! not written: an open reads the map, not the chunks.
//!
//!   S3BLK_BENCH_ENDPOINT=http://127.0.0.1:PORT  (required)
//!   S3BLK_BENCH_CHUNKS=1048576                  mapped chunks, 1 MiB each

use std::sync::Arc;
use std::time::{Duration, Instant};

use s3blk::store::DynStore;
use s3blk::store::retry::{RetryPolicy, RetryStore};
use s3blk::store::s3::{S3Settings, S3Store};
use s3blk::volume::engine::CreateOptions;
use s3blk::volume::format::{Checkpoint, ChunkRef, generation};
use s3blk::volume::{OpenOptions, Volume, replay};

const CHUNK: u32 = 1 << 20;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let endpoint = std::env::var("S3BLK_BENCH_ENDPOINT")
        .map_err(|_| anyhow::anyhow!("set S3BLK_BENCH_ENDPOINT to the S3 server (bench/open.sh does)"))?;
    let chunks: u64 = match std::env::var("S3BLK_BENCH_CHUNKS") {
        Ok(s) => s.parse().map_err(|e| anyhow::anyhow!("S3BLK_BENCH_CHUNKS={s}: {e}"))?,
        Err(_) => 1 << 20,
    };
    let bucket = format!("open-bench-{:08x}", rand::random::<u32>());
    let settings = S3Settings {
        endpoint: Some(endpoint),
        region: Some("us-east-1".into()),
        credentials: Some(("testing".into(), "testing".into())),
    };
    let raw = S3Store::connect(&bucket, settings).await?;
    raw.client().create_bucket().bucket(&bucket).send().await?;
    let store: DynStore = Arc::new(RetryStore::new(Arc::new(raw), RetryPolicy::default()));
    let vol = "bench/";
    let size = chunks * CHUNK as u64;
    let opts = CreateOptions {
        size,
        chunk_size: CHUNK,
        parent: None,
        single_writer: false,
        compression: None,
        encryption: None,
    };
    Volume::create(store.clone(), vol, opts, &s3blk::clock::SystemClock).await?;
    let st = replay::replay(store.as_ref(), vol, CHUNK as u64, None).await?;
    let map = (0..chunks)
        .map(|i| {
            (
                i,
                ChunkRef::Stored {
                    generation: generation(1, i + 1),
                    crc: i as u32,
                    layout: s3blk::volume::format::Layout::Table,
                },
            )
        })
        .collect();
    let cp = Checkpoint { seq: st.head, epoch: st.epoch, size, map, patches: Default::default() };
    let t = Instant::now();
    replay::write_checkpoint(store.as_ref(), vol, &cp).await?;
    let written = t.elapsed();
    drop(cp);
    let objects = s3blk::store::list_all(store.as_ref(), &s3blk::volume::format::checkpoint_prefix(vol)).await?;
    let bytes: u64 = objects.iter().map(|o| o.size).sum();
    println!(
        "volume: {} GiB, {chunks} mapped chunks of 1 MiB; checkpoint: {} objects, {:.1} MB, written in {:.2} s",
        size >> 30,
        objects.len(),
        bytes as f64 / 1e6,
        written.as_secs_f64()
    );
    let mut ro = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let v = Volume::open(store.clone(), vol, OpenOptions { read_only: true, ..OpenOptions::default() }).await?;
        ro.push(t.elapsed());
        assert_eq!(v.stats().mapped_chunks, chunks, "the opened volume maps every chunk");
    }
    let t = Instant::now();
    let w = Volume::open(store.clone(), vol, OpenOptions::default()).await?;
    let writer = t.elapsed();
    drop(w);
    ro.sort();
    let target = Duration::from_secs(2);
    let verdict = |d: Duration| if d < target { "met" } else { "MISSED" };
    println!(
        "open read-only: median {:.2} s of 3 ({:.2}x the 2 s target: {})",
        ro[1].as_secs_f64(),
        ro[1].as_secs_f64() / target.as_secs_f64(),
        verdict(ro[1])
    );
    println!(
        "open as writer: {:.2} s ({:.2}x the 2 s target: {})",
        writer.as_secs_f64(),
        writer.as_secs_f64() / target.as_secs_f64(),
        verdict(writer)
    );
    Ok(())
}
