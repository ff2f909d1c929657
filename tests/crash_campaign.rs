//! Black-box crash campaign: `s3blk serve` on a real S3 server (moto) is
//! killed with SIGKILL at random moments while a client writes stamped 4 KiB
//! blocks and flushes, and while compaction runs (inside the server, and in
//! a second `s3blk compact` process). After every restart each block must
//! hold its last flushed stamp or a later one written there, never an
//! older one, never one written elsewhere, never zeros in place of flushed
//! data. `fsck` must be clean at the end. With the write-back log (the
//! second campaign), the floor is the last acknowledged write of each
//! block instead: a restarted server replays the log.
//!
//! `S3BLK_CRASH_CYCLES` sets the number of kill/restart cycles (20 by
//! default, what CI runs); `S3BLK_CRASH_SEED` replays a run.
//! `scripts/crash-campaign.sh` runs the long form.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCK: usize = 4096;
const BLOCKS: u64 = 512; // 2 MiB: 32 chunks of 64 KiB
const MAGIC: &[u8; 8] = b"S3BLKCC1";

/// A block's content: magic, block number, stamp, then bytes derived from both.
fn stamp(block: u64, seq: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOCK);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&block.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&common::pattern(block ^ (seq << 16), BLOCK - 24));
    b
}

/// What a block read back holds: zeros, a well-formed stamp, or garbage.
#[derive(Debug, PartialEq)]
enum Seen {
    Zeros,
    Stamp { block: u64, seq: u64 },
    Garbage,
}

fn parse(buf: &[u8]) -> Seen {
    if buf.iter().all(|&b| b == 0) {
        return Seen::Zeros;
    }
    if buf.len() != BLOCK || &buf[..8] != MAGIC {
        return Seen::Garbage;
    }
    let block = u64::from_le_bytes(buf[8..16].try_into().unwrap_or_default());
    let seq = u64::from_le_bytes(buf[16..24].try_into().unwrap_or_default());
    if stamp(block, seq) == buf { Seen::Stamp { block, seq } } else { Seen::Garbage }
}

/// Per block: the floor (newest stamp that must have survived) and every
/// stamp ever sent to it (any of those at or above the floor may show up).
struct Oracle {
    floor: Vec<u64>,
    sent: Vec<BTreeSet<u64>>,
}

impl Oracle {
    fn check(&mut self, block: u64, buf: &[u8]) -> Result<(), String> {
        let b = block as usize;
        match parse(buf) {
            Seen::Zeros if self.floor[b] == 0 => {
                // Zeros are now what the volume holds: an unflushed stamp
                // lost here may never come back.
                self.sent[b].clear();
                Ok(())
            }
            Seen::Zeros => Err(format!("block {block}: zeros, but stamp {} was acknowledged", self.floor[b])),
            Seen::Garbage => Err(format!("block {block}: bytes never written anywhere")),
            Seen::Stamp { block: other, seq } if other != block => {
                Err(format!("block {block}: holds stamp {seq} of block {other}"))
            }
            Seen::Stamp { seq, .. } if seq < self.floor[b] => {
                Err(format!("block {block}: stamp {seq} is older than the acknowledged {}", self.floor[b]))
            }
            Seen::Stamp { seq, .. } if !self.sent[b].contains(&seq) => {
                Err(format!("block {block}: stamp {seq} was never written there"))
            }
            Seen::Stamp { seq, .. } => {
                // What a fresh server reads is committed: the new floor.
                self.floor[b] = seq;
                Ok(())
            }
        }
    }
}

struct Server {
    child: Child,
}

fn start_server(ep: &str, url: &str, sock: &Path, create: bool, log: Option<&Path>, stderr: &Path) -> Server {
    let _ = std::fs::remove_file(sock);
    let stderr = std::fs::OpenOptions::new().create(true).append(true).open(stderr).expect("stderr file");
    let mut cmd = Command::new(common::s3blk_bin());
    match log {
        Some(dir) => cmd.arg("serve").arg("--write-log-dir").arg(dir),
        None => cmd.args(["serve", "--no-write-log"]),
    };
    cmd.envs(common::s3_env(ep))
        .arg(url)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        // Small enough that background uploads and commits run between
        // flushes; compaction every second with a safety age well above
        // the commit deadline, so it runs beside the writer as designed.
        .args(["--dirty-limit", "256KiB", "--compact-interval", "1", "--compact-safety-age", "4"])
        .args(["--commit-deadline", "2", "--retry-attempts", "3", "--attempt-timeout", "2"])
        .stdout(Stdio::piped())
        .stderr(stderr);
    if create {
        cmd.args(["--create", "--size", "2MiB", "--chunk-size", "64KiB"]);
    }
    let mut child = cmd.spawn().expect("spawn s3blk serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    assert!(first.starts_with("serving "), "serve did not start: {first:?}");
    std::thread::spawn(move || for _ in lines {});
    Server { child }
}

fn kill9(s: &mut Server) {
    let _ = s.child.kill(); // SIGKILL
    let _ = s.child.wait();
}

/// Without a write-back log: every write acknowledged by a FLUSH survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_flushes_survive_sigkill_at_random_moments() {
    campaign(false, 10).await;
}

/// With the write-back log (what `serve` does by default): every write
/// acknowledged at all survives, flushed or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_write_back_log_acknowledged_writes_survive_sigkill_at_random_moments() {
    campaign(true, 20).await;
}

async fn campaign(with_log: bool, default_cycles: u64) {
    let Some(ep) = common::s3_endpoint() else { return };
    let bucket = common::unique("crash");
    common::s3_raw_store(&bucket).await.expect("bucket");
    let url = format!("s3://{bucket}/campaign/vol");
    let cycles: u64 = std::env::var("S3BLK_CRASH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(default_cycles);
    let seed: u64 = std::env::var("S3BLK_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("crash campaign: {cycles} cycles, S3BLK_CRASH_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vol.sock");
    let log_dir = dir.path().join("write-log");
    let log = with_log.then_some(log_dir.as_path());
    let stderr = dir.path().join("serve.stderr");
    let mut oracle = Oracle { floor: vec![0; BLOCKS as usize], sent: vec![BTreeSet::new(); BLOCKS as usize] };
    let mut seq = 0u64;
    let (mut flushes, mut verified_bytes, mut compactions) = (0u64, 0u64, 0u64);

    for cycle in 0..=cycles {
        let mut srv = start_server(&ep, &url, &sock, cycle == 0, log, &stderr);
        let mut c = common::nbd_client::Client::connect(&sock, "vol").await;

        // After a restart: every block is checked against the oracle.
        for block in 0..BLOCKS {
            let buf = c.read(1, block * BLOCK as u64, BLOCK as u32).await.expect("read after restart");
            if let Err(e) = oracle.check(block, &buf) {
                panic!("cycle {cycle}: {e} (replay with S3BLK_CRASH_SEED={seed})");
            }
        }
        verified_bytes += BLOCKS * BLOCK as u64;
        if cycle == cycles {
            kill9(&mut srv);
            break;
        }

        // Sometimes a second process compacts the volume at the same time.
        let compactor = rng.random_bool(0.3).then(|| {
            compactions += 1;
            Command::new(common::s3blk_bin())
                .envs(common::s3_env(&ep))
                .args(["compact", &url, "--compact-safety-age", "4"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn s3blk compact")
        });

        // Write and flush until SIGKILL lands at a random moment, from
        // another thread: in the middle of a request, an upload, a commit.
        let kill_after = Duration::from_millis(rng.random_range(50..1500));
        let pid = srv.child.id() as libc::pid_t;
        let killer = std::thread::spawn(move || {
            std::thread::sleep(kill_after);
            // SAFETY: kill(2) on our own child's pid; the child is reaped only after this thread is joined.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let mut acked: Vec<(u64, u64)> = Vec::new();
        let mut handle = 10u64;
        loop {
            handle += 1;
            if rng.random_bool(0.15) {
                let covered = acked.clone();
                match c.try_flush(handle).await {
                    Ok(0) => {
                        flushes += 1;
                        for (b, s) in covered {
                            let f = &mut oracle.floor[b as usize];
                            *f = (*f).max(s);
                        }
                    }
                    _ => break,
                }
            } else {
                // Runs of neighbouring blocks, so whole chunks get dirty too.
                let first = rng.random_range(0..BLOCKS);
                let run = rng.random_range(1..=24u64).min(BLOCKS - first);
                let mut ok = true;
                for block in first..first + run {
                    seq += 1;
                    oracle.sent[block as usize].insert(seq);
                    match c.try_write(handle, block * BLOCK as u64, &stamp(block, seq)).await {
                        // With the log, an acknowledged write is as safe as a flushed one.
                        Ok(0) if with_log => {
                            let f = &mut oracle.floor[block as usize];
                            *f = (*f).max(seq);
                        }
                        Ok(0) => acked.push((block, seq)),
                        _ => {
                            ok = false;
                            break;
                        }
                    }
                }
                if !ok {
                    break;
                }
            }
        }
        let _ = killer.join();
        let _ = srv.child.wait();

        if let Some(mut p) = compactor {
            let _ = p.wait();
        }
    }

    let out = Command::new(common::s3blk_bin()).envs(common::s3_env(&ep)).args(["fsck", &url]).output().expect("fsck");
    assert!(
        out.status.success(),
        "fsck: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let replays = std::fs::read_to_string(&stderr).unwrap_or_default().matches("unflushed writes (").count();
    if with_log {
        assert!(replays > 0, "no restart replayed a write-back log: the campaign did not test it");
    }
    eprintln!(
        "crash campaign (write-back log: {with_log}): {cycles} SIGKILL cycles, {flushes} acknowledged flushes, \
         {compactions} concurrent compactions, {replays} restarts replayed unflushed writes, {verified_bytes} bytes \
         verified, nothing acknowledged lost"
    );
}
