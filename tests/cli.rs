//! The `s3blk` binary as a user runs it, against the local store and S3.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn s3blk(env: &[(&'static str, String)], args: &[&str]) -> Output {
    let mut c = Command::new(common::s3blk_bin());
    c.args(args).env("S3BLK_RETRY_ATTEMPTS", "3").env("S3BLK_ATTEMPT_TIMEOUT", "20");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run s3blk")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "s3blk failed ({:?}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A failed command prints exactly one line, `error: …`, and no panic.
fn one_line_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected exit 1, stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "unexpected error: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn round_trip(env: &[(&'static str, String)], vol: &str, store_url: &str, dir: &Path) {
    let input = dir.join("in.bin");
    // 5 MiB + an unaligned tail: partial last chunk.
    let mut data = common::pattern(42, (5 << 20) + 1234);
    data[(2 << 20)..(3 << 20)].fill(0);
    std::fs::write(&input, &data).expect("write input");
    let out = ok(&s3blk(env, &["volume", "create", vol, "--size", "8MiB", "--chunk-size", "1MiB"]));
    assert!(out.contains("created"), "{out}");
    ok(&s3blk(env, &["volume", "import", vol, input.to_str().expect("path")]));
    let output = dir.join("out.bin");
    ok(&s3blk(env, &["volume", "export", vol, output.to_str().expect("path")]));
    let back = std::fs::read(&output).expect("read output");
    assert_eq!(back.len(), 8 << 20);
    assert!(back[..data.len()] == data[..], "exported bytes differ");
    assert!(back[data.len()..].iter().all(|&b| b == 0));
    let fsck = ok(&s3blk(env, &["fsck", vol]));
    assert!(fsck.contains("clean"), "{fsck}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&s3blk(env, &["volume", "inspect", vol, "--json"]))).expect("inspect json");
    assert_eq!(json["size"], 8 << 20);
    // Four whole chunks stored; the 1234-byte tail went inline (a page patch).
    assert_eq!(json["stored_chunks"], 4, "the zero chunk and the untouched ones cost nothing: {json}");
    assert_eq!(json["chunks_with_table"], 4, "new chunks are stored with their table (format 4): {json}");
    assert_eq!((json["patched_chunks"].as_u64(), json["patch_bytes"].as_u64()), (Some(1), Some(4096)), "{json}");
    let list = ok(&s3blk(env, &["volume", "list", store_url]));
    let name = vol.rsplit('/').next().expect("name");
    assert!(list.contains(name), "{list}");
    // Snapshot, overwrite, export the snapshot: the old bytes.
    ok(&s3blk(env, &["volume", "snapshot", vol, "before"]));
    one_line_error(&s3blk(env, &["volume", "snapshot", vol, "before"]), "already exists");
    let zeros = dir.join("zeros.bin");
    std::fs::write(&zeros, vec![0u8; 1 << 20]).expect("write");
    ok(&s3blk(env, &["volume", "import", vol, zeros.to_str().expect("path")]));
    let snap_out = dir.join("snap.bin");
    ok(&s3blk(env, &["volume", "export", vol, snap_out.to_str().expect("path"), "--snapshot", "before"]));
    assert!(std::fs::read(&snap_out).expect("read")[..data.len()] == data[..]);
    ok(&s3blk(env, &["volume", "resize", vol, "--size", "16MiB"]));
    let list = ok(&s3blk(env, &["volume", "list", store_url]));
    assert!(list.lines().any(|l| l.contains(name) && l.contains("16 MiB")), "list shows the size after resize: {list}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&s3blk(env, &["volume", "inspect", vol, "--json"]))).expect("inspect json");
    assert_eq!(json["size"], 16 << 20);
    // Compaction folds the journal; the volume and its snapshot read the same.
    let text = ok(&s3blk(env, &["compact", vol, "--dry-run"]));
    assert!(text.contains("would delete"), "{text}");
    let rep: serde_json::Value =
        serde_json::from_str(&ok(&s3blk(env, &["compact", vol, "--safety-age", "0", "--json"]))).expect("compact json");
    assert!(rep["journal_records_deleted"].as_u64().is_some_and(|n| n > 0), "{rep}");
    ok(&s3blk(env, &["volume", "export", vol, snap_out.to_str().expect("path"), "--snapshot", "before"]));
    assert!(std::fs::read(&snap_out).expect("read")[..data.len()] == data[..]);
    ok(&s3blk(env, &["volume", "export", vol, output.to_str().expect("path")]));
    let back = std::fs::read(&output).expect("read output");
    assert!(back[..1 << 20].iter().all(|&b| b == 0) && back[1 << 20..data.len()] == data[1 << 20..]);
    let fsck: serde_json::Value = serde_json::from_str(&ok(&s3blk(env, &["fsck", vol, "--json"]))).expect("fsck json");
    assert_eq!(fsck["clean"], true, "{fsck}");
    assert_eq!(fsck["garbage_chunks"], 0, "{fsck}");
    ok(&s3blk(env, &["volume", "delete", vol]));
    let list = ok(&s3blk(env, &["volume", "list", store_url]));
    assert!(!list.contains(name), "{list}");
    one_line_error(&s3blk(env, &["volume", "delete", vol]), "does not exist");
}

#[test]
fn cli_round_trip_local() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let vol = store.join("vol1");
    round_trip(&[], vol.to_str().expect("path"), store.to_str().expect("path"), dir.path());
}

#[test]
fn cli_round_trip_s3() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let bucket = common::unique("cli");
    let Some(_store) = rt.block_on(common::s3_raw_store(&bucket)) else { return };
    let env = common::s3_env(&common::s3_endpoint().expect("endpoint"));
    let dir = tempfile::tempdir().expect("tempdir");
    round_trip(&env, &format!("s3://{bucket}/team/vol1"), &format!("s3://{bucket}/team"), dir.path());
}

#[test]
fn bad_input_gives_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("v");
    let v = vol.to_str().expect("path");
    one_line_error(&s3blk(&[], &["volume", "create", v, "--size", "0"]), "non-zero");
    one_line_error(&s3blk(&[], &["volume", "create", v, "--size", "1GiB", "--chunk-size", "3000"]), "power of two");
    one_line_error(&s3blk(&[], &["volume", "inspect", v]), "not found");
    one_line_error(&s3blk(&[], &["volume", "create", "ftp://x/y", "--size", "1GiB"]), "not a valid URL");
    one_line_error(&s3blk(&[], &["volume", "create", "s3://bucket", "--size", "1GiB"]), "no volume name");
    ok(&s3blk(&[], &["volume", "create", v, "--size", "1MiB", "--chunk-size", "64KiB"]));
    one_line_error(&s3blk(&[], &["volume", "create", v, "--size", "1MiB"]), "already exists");
    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![1u8; (1 << 20) + 4096]).expect("write");
    one_line_error(&s3blk(&[], &["volume", "import", v, big.to_str().expect("path")]), "more than the volume");
    one_line_error(&s3blk(&[], &["volume", "export", v, "/nonexistent-dir/x"]), "cannot create");
    one_line_error(&s3blk(&[], &["volume", "export", v, "-", "--snapshot", "nope"]), "snapshot nope not found");
    one_line_error(&s3blk(&[], &["volume", "resize", v, "--size", "64KiB"]), "shrinking");
    // A size that is no multiple of 4 KiB is rounded up, as at create.
    assert!(ok(&s3blk(&[], &["volume", "resize", v, "--size", "2000001"])).contains("1.91 MiB"));
    // A prefix that holds no volume: its lease.json (someone else's) is
    // neither overwritten nor deleted.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).expect("mkdir");
    std::fs::write(foreign.join("lease.json"), b"app data").expect("write");
    let f = foreign.to_str().expect("path");
    one_line_error(&s3blk(&[], &["volume", "resize", f, "--size", "1MiB"]), "not found");
    let sock = format!("unix:{}", dir.path().join("s.sock").display());
    let served = s3blk(&[], &["serve", f, "--listen", &sock]);
    assert_eq!(served.status.code(), Some(1), "{served:?}");
    assert_eq!(std::fs::read(foreign.join("lease.json")).expect("the foreign lease.json"), b"app data");
    let out = s3blk(&[], &["compact", v, "--safety-age", "5 days"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown unit"), "{out:?}");
    // Durations too large to compute with are refused, not wrapped (a
    // safety age that wrapped made every object old) nor a panic.
    for args in [
        &["compact", v, "--safety-age", "18446744073709551615"][..],
        &["volume", "export", v, "-", "--commit-deadline", "10000000000000000000"][..],
    ] {
        let out = s3blk(&[], args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("too large"), "{args:?}: {out:?}");
    }
    // clap's own usage errors are not panics either.
    let out = s3blk(&[], &["volume", "create", v, "--size", "lots"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid size"));
    // Nothing above damaged the volume.
    assert!(ok(&s3blk(&[], &["fsck", v])).contains("clean"));
}

#[test]
fn fsck_exits_2_on_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("v");
    let v = vol.to_str().expect("path");
    ok(&s3blk(&[], &["volume", "create", v, "--size", "1MiB", "--chunk-size", "64KiB"]));
    let input = dir.path().join("in");
    std::fs::write(&input, common::pattern(3, 200_000)).expect("write");
    ok(&s3blk(&[], &["volume", "import", v, input.to_str().expect("path")]));
    let chunk_dir = vol.join("chunks/0000000000000001");
    let chunk = std::fs::read_dir(&chunk_dir).expect("chunk dir").next().expect("a chunk").expect("entry").path();
    let mut bytes = std::fs::read(&chunk).expect("read");
    bytes[5] ^= 0xff;
    std::fs::write(&chunk, bytes).expect("write");
    let out = s3blk(&[], &["fsck", v]);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("DAMAGED") && text.contains("checksum"), "{text}");
    let out = s3blk(&[], &["volume", "export", v, "-"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fails its checksum"));
}

fn children_peak_rss_bytes() -> u64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    assert_eq!(rc, 0);
    ru.ru_maxrss as u64 * 1024
}

/// Importing 2 GiB without any intermediate flush must keep the process's
/// memory near the dirty limit, not near the data size.
#[test]
fn import_memory_stays_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("v");
    let v = vol.to_str().expect("path");
    ok(&s3blk(&[], &["volume", "create", v, "--size", "2GiB"]));
    let dirty_limit: u64 = 64 << 20;
    let cache: u64 = 16 << 20;
    let mut child = Command::new(common::s3blk_bin())
        .args(["volume", "import", v, "-", "--dirty-limit", "64MiB", "--cache-size", "16MiB"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn import");
    let mut stdin = child.stdin.take().expect("stdin");
    let block = common::pattern(7, 1 << 20);
    for i in 0..2048u32 {
        let mut b = block.clone();
        b[..4].copy_from_slice(&i.to_le_bytes());
        stdin.write_all(&b).expect("feed import");
    }
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let peak = children_peak_rss_bytes();
    let allowance = dirty_limit + cache + (64 << 20);
    eprintln!(
        "import of 2 GiB: peak RSS {} MiB (dirty limit {} MiB, cache {} MiB, allowance {} MiB)",
        peak >> 20,
        dirty_limit >> 20,
        cache >> 20,
        allowance >> 20
    );
    assert!(peak < allowance, "peak RSS {} MiB exceeds {} MiB", peak >> 20, allowance >> 20);
    let fsck: serde_json::Value =
        serde_json::from_str(&ok(&s3blk(&[], &["fsck", v, "--json", "--quick"]))).expect("json");
    assert_eq!(fsck["clean"], true);
    assert_eq!(fsck["referenced_chunks"], 2048);
}

#[test]
fn delete_refuses_to_break_clones_and_a_deleted_clone_lets_go_of_its_parent() {
    use s3blk::volume::engine::{CreateOptions, snapshot_committed};
    use s3blk::volume::format::{ParentRef, snapshot_key};
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("store");
    let parent = root.join("parent");
    let p = parent.to_str().expect("path");
    ok(&s3blk(&[], &["volume", "create", p, "--size", "1MiB", "--chunk-size", "64KiB"]));
    // A clone as the CSI controller makes one: a snapshot pinning the
    // source, a marker in the parent, a volume reading through it.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let store = common::local_store(&root);
    rt.block_on(async {
        let clock = s3blk::clock::SystemClock;
        let rec = snapshot_committed(&store, "parent/", "clone-child", Some("child/"), &clock).await.expect("snapshot");
        s3blk::volume::catalog::add_clone_marker(&store, "parent/", "child/", "child/", rec.seq).await.expect("marker");
        let parent = Some(ParentRef { volume: "parent/".into(), snapshot: "clone-child".into(), seq: rec.seq });
        let opts = CreateOptions { parent, ..CreateOptions::new(1 << 20, 64 << 10) };
        s3blk::volume::Volume::create(store.clone(), "child/", opts, &clock).await.expect("clone");
    });
    one_line_error(&s3blk(&[], &["volume", "delete", p]), "clones reading through its snapshots (child)");
    assert!(ok(&s3blk(&[], &["fsck", p])).contains("clean"), "the refused delete changed nothing");
    ok(&s3blk(&[], &["volume", "delete", root.join("child").to_str().expect("path")]));
    let left = rt.block_on(s3blk::store::list_all(store.as_ref(), "parent/")).expect("list");
    let keys: Vec<&str> = left.iter().map(|o| o.key.as_str()).collect();
    assert!(!keys.iter().any(|k| k.contains("clones/")), "marker left behind: {keys:?}");
    assert!(!keys.contains(&snapshot_key("parent/", "clone-child").as_str()), "pin left behind: {keys:?}");
    ok(&s3blk(&[], &["volume", "delete", p]));
}

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("logged");
    let vol = vol.to_str().expect("path");
    let input = dir.path().join("in.bin");
    std::fs::write(&input, common::pattern(7, 4096)).expect("write input");
    let out = s3blk(
        &[("S3BLK_LOG", "info".to_string())],
        &["volume", "import", vol, input.to_str().expect("path"), "--create", "--size", "1MiB"],
    );
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("volume opened"), "expected an info log line: {err}");
    assert!(!err.contains('\u{1b}'), "escape codes in logs written to a pipe: {err:?}");
}

#[test]
fn delete_leaves_whatever_is_not_an_s3blk_volume_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |p: &str| dir.path().join(p).to_str().expect("path").to_string();
    // Someone's directory of files.
    std::fs::create_dir(dir.path().join("notes")).expect("mkdir");
    std::fs::write(dir.path().join("notes/todo.txt"), b"keep me").expect("write");
    one_line_error(&s3blk(&[], &["volume", "delete", &path("notes")]), "nothing was deleted");
    assert_eq!(std::fs::read(dir.path().join("notes/todo.txt")).expect("still there"), b"keep me");
    // A store: a directory of volumes.
    for v in ["store/v1", "store/v2"] {
        ok(&s3blk(&[], &["volume", "create", &path(v), "--size", "1MiB", "--chunk-size", "64KiB"]));
    }
    one_line_error(&s3blk(&[], &["volume", "delete", &path("store")]), "holds another volume");
    // A volume with a stranger's file in it.
    std::fs::write(dir.path().join("store/v1/mine.txt"), b"not s3blk's").expect("write");
    one_line_error(&s3blk(&[], &["volume", "delete", &path("store/v1")]), "did not write");
    for v in ["store/v1", "store/v2"] {
        assert!(ok(&s3blk(&[], &["fsck", &path(v)])).contains("clean"), "{v} was touched");
    }
    // s3blk's names without volume.json or a deletion marker prove nothing.
    std::fs::remove_file(dir.path().join("store/v2/volume.json")).expect("rm");
    one_line_error(&s3blk(&[], &["volume", "delete", &path("store/v2")]), "is not an s3blk volume");
    assert!(dir.path().join("store/v2/journal").read_dir().expect("journal").next().is_some());
    // The store probe a failed create left behind (its delete lost) is s3blk's own: it goes.
    std::fs::create_dir(dir.path().join("failed")).expect("mkdir");
    std::fs::write(dir.path().join("failed/.s3blk-probe-0123456789abcdef"), b"1").expect("write");
    assert!(
        ok(&s3blk(&[], &["volume", "delete", &path("failed")])).contains("deleted the 1 objects a failed create left")
    );
    assert!(!dir.path().join("failed/.s3blk-probe-0123456789abcdef").exists());
    // Once the stranger's file is gone, the volume goes.
    std::fs::remove_file(dir.path().join("store/v1/mine.txt")).expect("rm");
    assert!(ok(&s3blk(&[], &["volume", "delete", &path("store/v1")])).contains("deleted"));
    assert!(!dir.path().join("store/v1/volume.json").exists());
}

/// The CSI controller compacts beside live writers: a safety age under
/// 120 s is refused at start-up, with one clear line and no socket left;
/// with its compaction off the same age is no reason to refuse.
#[test]
fn the_csi_controller_refuses_a_safety_age_too_short_beside_live_writers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("csi.sock");
    let endpoint = format!("unix://{}", sock.display());
    let start = |extra: &[&str]| {
        let mut c = Command::new(common::s3blk_bin());
        c.args(["csi", "--mode", "controller", "--endpoint", &endpoint, "--compaction", "store"]);
        c.args(["--store", dir.path().join("store").to_str().expect("path")]).args(extra);
        c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run s3blk csi")
    };
    // Bounded: a controller that starts would run until killed.
    let finish = |mut child: std::process::Child| -> Option<Output> {
        for _ in 0..600 {
            if child.try_wait().expect("wait").is_some() {
                return Some(child.wait_with_output().expect("output"));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        child.kill().expect("kill");
        let _ = child.wait();
        None
    };
    let out = finish(start(&["--compact-safety-age", "119s"])).expect("the controller started with a 119 s safety age");
    one_line_error(&out, "safety age of 119s is shorter than 120s");
    assert!(!sock.exists(), "a refused controller left its socket");
    // At 120 s, or with compaction off, it starts (and is stopped here).
    for extra in [&["--compact-safety-age", "120s"][..], &["--compact-safety-age", "0", "--compact-interval", "0"]] {
        let child = start(extra);
        for _ in 0..600 {
            if sock.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let mut child = child;
        let running = child.try_wait().expect("wait").is_none();
        let started = sock.exists();
        child.kill().expect("kill");
        let out = child.wait_with_output().expect("output");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(running && started, "the controller did not start with {extra:?}: {err}");
        let _ = std::fs::remove_file(&sock);
    }
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("metadata").blocks() * 512
}

/// `volume export` writes a file target sparse (holes where the volume
/// reads zeros) unless `--dense`; to a pipe whose reader leaves early it
/// stops quietly; `volume import` reports committed bytes, not bytes read.
#[test]
fn export_is_sparse_and_stops_quietly_at_a_closed_pipe() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("sp");
    let vol = vol.to_str().expect("path");
    ok(&s3blk(&[], &["volume", "create", vol, "--size", "64MiB", "--chunk-size", "1MiB"]));
    let input = dir.path().join("in.bin");
    let mut data = common::pattern(3, 8 << 20);
    data[(2 << 20)..(6 << 20)].fill(0);
    std::fs::write(&input, &data).expect("input");
    let imp = s3blk(&[("S3BLK_DIRTY_LIMIT", "2MiB".into())], &["volume", "import", vol, input.to_str().expect("path")]);
    ok(&imp);
    let err = String::from_utf8_lossy(&imp.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert!(lines.last().is_some_and(|l| l.starts_with("committed 8 MiB in ")), "import progress: {err}");
    assert!(lines.iter().all(|l| l.starts_with("committed ")), "import progress: {err}");

    let sparse = dir.path().join("sparse.img");
    ok(&s3blk(&[], &["volume", "export", vol, sparse.to_str().expect("path")]));
    let back = std::fs::read(&sparse).expect("read");
    assert_eq!(back.len(), 64 << 20);
    assert!(back[..data.len()] == data[..] && back[data.len()..].iter().all(|&b| b == 0));
    assert!(allocated(&sparse) <= 5 << 20, "sparse export allocated {} bytes for 4 MiB of data", allocated(&sparse));

    let dense = dir.path().join("dense.img");
    ok(&s3blk(&[], &["volume", "export", vol, dense.to_str().expect("path"), "--dense"]));
    assert_eq!(std::fs::read(&dense).expect("read"), back);
    assert!(allocated(&dense) >= 60 << 20, "--dense allocated only {} bytes", allocated(&dense));

    // `| head -c 1000`: the reader leaves; the export ends at once, silent.
    let mut child = Command::new(common::s3blk_bin())
        .args(["volume", "export", vol, "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn export");
    let mut first = [0u8; 1000];
    std::io::Read::read_exact(child.stdout.as_mut().expect("stdout"), &mut first).expect("read");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    assert_eq!(first[..], data[..1000]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("error") && !err.contains("panicked"), "export to a closed pipe: {err}");
    assert_eq!(out.status.code(), Some(141), "{err}");
}

/// Mistakes people make, answered in their terms: a mistyped URL is an
/// error and never becomes a local directory; read-only commands create
/// nothing; sizes are rounded to blocks with a note; ranges are stated;
/// `--listen tcp://` works; `compact --json` names its volume.
#[test]
fn mistakes_get_answers_in_the_users_terms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let in_dir = |args: &[&str]| {
        Command::new(common::s3blk_bin()).args(args).current_dir(dir.path()).output().expect("run s3blk")
    };
    one_line_error(&in_dir(&["volume", "create", "s3:/bucket/v", "--size", "1GiB"]), "S3 volume URLs are s3://");
    one_line_error(&in_dir(&["volume", "inspect", "s3:bucket/v"]), "not a valid URL");
    one_line_error(&in_dir(&["volume", "create", "file:/tmp/v", "--size", "1GiB"]), "file:///");
    one_line_error(&in_dir(&["volume", "list", "nonexistent/dir"]), "does not exist");
    one_line_error(&in_dir(&["volume", "inspect", "nonexistent/v"]), "does not exist");
    one_line_error(&in_dir(&["fsck", "gone/v"]), "does not exist");
    let left: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").collect();
    assert!(left.is_empty(), "commands that failed created {left:?}");

    let out = in_dir(&["volume", "create", "vols/v", "--size", "1GB"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("rounded up to 1000001536 bytes"), "{err}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&in_dir(&["volume", "inspect", "vols/v", "--json"]))).expect("inspect json");
    assert_eq!(json["size"], 1_000_001_536u64);
    one_line_error(
        &in_dir(&["volume", "create", "vols/w", "--size", "1GiB", "--chunk-size", "1TiB"]),
        "a power of two from 64 KiB to 64 MiB",
    );
    one_line_error(&in_dir(&["volume", "create", "vols/w", "--size", "2EiB"]), "at most 1 EiB");
    let rep: serde_json::Value =
        serde_json::from_str(&ok(&in_dir(&["compact", "vols/v", "--json"]))).expect("compact json");
    assert!(rep["volume"].as_str().is_some_and(|v| v.ends_with("vols/v")), "{rep}");

    let mut child = Command::new(common::s3blk_bin())
        .args(["serve", "vols/v", "--listen", "tcp://127.0.0.1:0"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().expect("stdout")), &mut first)
        .expect("read");
    let _ = child.kill();
    let _ = child.wait();
    assert!(first.starts_with("serving ") && first.contains(" on 127.0.0.1:"), "{first}");
}

/// S3 trouble in one line a user can act on: a missing bucket is named,
/// missing credentials fail at once with a hint (not ten seconds of
/// "transient" retries), an unreachable endpoint is named with the cause;
/// no Rust debug formatting anywhere.
#[test]
fn s3_errors_name_the_cause() {
    let Some(endpoint) = common::s3_endpoint() else { return };
    let run = |env: &[(&str, String)], remove: &[&str], args: &[&str]| {
        let mut c = Command::new(common::s3blk_bin());
        c.args(args).env("S3BLK_RETRY_ATTEMPTS", "3");
        for k in remove {
            c.env_remove(k);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        let start = std::time::Instant::now();
        let out = c.output().expect("run s3blk");
        (out, start.elapsed())
    };
    let no_debug = |err: &str| {
        for debug in ["ConnectorError", "ConnectError(", "Tcp(", "Unix(", "Some(", "kind:"] {
            assert!(!err.contains(debug), "debug formatting in {err}");
        }
    };
    let env = common::s3_env(&endpoint);
    let (out, _) = run(&env, &[], &["volume", "create", "s3://no-such-bucket-s3blk/v", "--size", "1MiB"]);
    one_line_error(&out, "bucket no-such-bucket-s3blk does not exist");
    no_debug(&String::from_utf8_lossy(&out.stderr));

    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "").expect("empty config");
    let nowhere = empty.display().to_string();
    let bare: Vec<(&str, String)> = vec![
        ("AWS_ENDPOINT_URL", endpoint.clone()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", nowhere.clone()),
        ("AWS_CONFIG_FILE", nowhere),
        ("HOME", dir.path().display().to_string()),
    ];
    let creds = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"];
    let (out, took) = run(&bare, &creds, &["volume", "inspect", "s3://bucket/v"]);
    one_line_error(&out, "no S3 credentials found");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");
    no_debug(&err);
    assert!(took < std::time::Duration::from_secs(5), "missing credentials were retried for {took:?}");

    let mut closed = env.clone();
    closed[0].1 = "http://127.0.0.1:9".into();
    let (out, _) = run(&closed, &[], &["volume", "inspect", "s3://bucket/v"]);
    one_line_error(&out, "cannot connect to http://127.0.0.1:9");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("refused"), "{err}");
    no_debug(&err);
}

/// Snapshots and clones from the CLI: list, clone from a snapshot or from
/// the committed state, delete the snapshot, compact, and the clones still
/// read what they were made from.
#[test]
fn snapshots_list_delete_and_clones_from_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |n: &str| dir.path().join(n).display().to_string();
    let (v, c1, c2) = (path("v"), path("c1"), path("c2"));
    ok(&s3blk(&[], &["volume", "create", &v, "--size", "4MiB", "--chunk-size", "64KiB"]));
    let first = common::pattern(1, 1 << 20);
    let second = common::pattern(2, 1 << 20);
    let input = dir.path().join("in");
    std::fs::write(&input, &first).expect("input");
    ok(&s3blk(&[], &["volume", "import", &v, input.to_str().expect("path")]));
    ok(&s3blk(&[], &["volume", "snapshot", &v, "s1"]));
    std::fs::write(&input, &second).expect("input");
    ok(&s3blk(&[], &["volume", "import", &v, input.to_str().expect("path")]));

    let list = ok(&s3blk(&[], &["volume", "snapshot", "list", &v]));
    assert!(list.lines().any(|l| l.starts_with("s1 ")), "{list}");
    let out = ok(&s3blk(&[], &["volume", "clone", &format!("{v}@s1"), &c1]));
    assert!(out.contains("reading through") && out.contains("@s1"), "{out}");
    ok(&s3blk(&[], &["volume", "clone", &v, &c2, "--size", "8MiB"]));
    one_line_error(&s3blk(&[], &["volume", "clone", &format!("{v}@nope"), &path("c3")]), "nope");
    one_line_error(&s3blk(&[], &["volume", "clone", &v, &c1]), "already exists");
    one_line_error(&s3blk(&[], &["volume", "clone", &v, "s3://other/c"]), "in the store of");
    // A refused clone onto an existing clone leaves that clone's pin alone.
    one_line_error(&s3blk(&[], &["volume", "clone", &format!("{v}@s1"), &c1, "--size", "4KiB"]), "already exists");
    one_line_error(&s3blk(&[], &["volume", "snapshot", &v, "clone-x"]), "reserved");

    ok(&s3blk(&[], &["volume", "snapshot", "delete", &v, "s1"]));
    let list = ok(&s3blk(&[], &["volume", "snapshot", "list", &v, "--json"]));
    assert_eq!(serde_json::from_str::<serde_json::Value>(&list).expect("json"), serde_json::json!([]));
    ok(&s3blk(&[], &["compact", &v, "--safety-age", "0"]));
    let read = |vol: &str| {
        let out = s3blk(&[], &["volume", "export", vol, "-"]);
        ok(&out);
        out.stdout
    };
    assert!(read(&c1)[..1 << 20] == first[..], "the clone of s1 lost what it read after s1 was deleted");
    let c2_bytes = read(&c2);
    assert_eq!(c2_bytes.len(), 8 << 20);
    assert!(c2_bytes[..1 << 20] == second[..], "the clone of the committed state");
    assert!(ok(&s3blk(&[], &["fsck", &c1])).contains("clean"));
    // The source is kept for its clones; they go first, or are flattened.
    one_line_error(&s3blk(&[], &["volume", "delete", &v]), "clones");
    ok(&s3blk(&[], &["volume", "delete", &c1]));
    one_line_error(&s3blk(&[], &["volume", "flatten", &v]), "is not a clone");
    // A snapshot of the clone from before keeps its parent until it goes.
    ok(&s3blk(&[], &["volume", "snapshot", &c2, "early"]));
    let kept = s3blk(&[], &["volume", "flatten", &c2]);
    assert!(String::from_utf8_lossy(&kept.stdout).contains("copied 16 chunks"), "{kept:?}");
    let err = String::from_utf8_lossy(&kept.stderr);
    assert_eq!(kept.status.code(), Some(1), "{err}");
    // Progress of the copy, then one error line.
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: ") && last.contains("snapshots taken before (early)"), "{err}");
    assert!(err.lines().filter(|l| l.starts_with("error")).count() == 1 && !err.contains("panicked"), "{err}");
    ok(&s3blk(&[], &["volume", "snapshot", "delete", &c2, "early"]));
    // The copy is on record: the second run only lets go of the parent.
    let out = ok(&s3blk(&[], &["volume", "flatten", &c2]));
    assert!(!out.contains("copied") && out.contains("no longer reads through"), "{out}");
    let inspect = ok(&s3blk(&[], &["volume", "inspect", &c2]));
    assert!(inspect.contains("parent:        none (flattened at seq"), "{inspect}");
    ok(&s3blk(&[], &["volume", "delete", &v]));
    assert!(!Path::new(&v).exists(), "the flattened clone's parent was not deleted");
    assert!(read(&c2) == c2_bytes, "the flattened clone reads other bytes without its parent");
    assert!(ok(&s3blk(&[], &["fsck", &c2])).contains("clean"));
    assert!(ok(&s3blk(&[], &["volume", "flatten", &c2])).contains("no longer reads through"), "run again");
    ok(&s3blk(&[], &["volume", "delete", &c2]));
}

/// Bytes of the files under `dir`, recursively.
fn bytes_under(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => bytes_under(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Text that compresses, then noise that does not, a MiB each, twice.
fn mixed_data() -> Vec<u8> {
    let line = b"2026-12-03T10:00:00Z level=info msg=\"checkpoint written\" table=orders rows=1024\n";
    let text: Vec<u8> = line.iter().cycle().take(1 << 20).copied().collect();
    let mut data = text.clone();
    data.extend(common::pattern(3, 1 << 20));
    data.extend(&text);
    data.extend(common::pattern(4, 1 << 20));
    data
}

/// A compressed volume through every CLI path: import into a new one,
/// export, snapshot and export of it, clone (which keeps the compression)
/// and a write through the clone, fsck with data verification; the text
/// takes less room in the store than it reads as, the noise as much.
#[test]
fn compressed_volumes_round_trip_through_the_cli() {
    for codec in ["lz4", "zstd"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store");
        let path = |n: &str| store.join(n).display().to_string();
        let (v, c) = (path("v"), path("c"));
        let data = mixed_data();
        let input = dir.path().join("in");
        std::fs::write(&input, &data).expect("input");
        let inp = input.to_str().expect("path");
        ok(&s3blk(&[], &["volume", "import", &v, inp, "--create", "--chunk-size", "256KiB", "--compression", codec]));
        let json: serde_json::Value =
            serde_json::from_str(&ok(&s3blk(&[], &["volume", "inspect", &v, "--json"]))).expect("inspect json");
        assert_eq!(json["compression"], codec, "{json}");
        assert_eq!(json["format_version"], 5, "{json}");
        assert_eq!((json["stored_chunks"].as_u64(), json["packed_chunks"].as_u64()), (Some(16), Some(8)), "{json}");
        // What the objects take, as the store holds them (the text packed).
        let stored_bytes = json["stored_bytes"].as_u64().expect("stored_bytes");
        assert_eq!(stored_bytes, bytes_under(&store.join("v").join("chunks")), "{json}");
        let text = ok(&s3blk(&[], &["volume", "inspect", &v]));
        assert!(text.contains(&format!("compression:   {codec} (8 of the stored chunks compressed)")), "{text}");
        let stored = bytes_under(&store.join("v").join("chunks"));
        assert!(stored < 3 << 20, "{codec}: 4 MiB stored in {stored} bytes");
        let export = |args: &[&str]| {
            let out = s3blk(&[], &[&["volume", "export"], args, &["-"]].concat());
            ok(&out);
            out.stdout
        };
        assert!(export(&[&v]) == data, "{codec}: the export differs");
        ok(&s3blk(&[], &["volume", "snapshot", &v, "s1"]));
        let zeros = dir.path().join("zeros");
        std::fs::write(&zeros, vec![0u8; 300_000]).expect("zeros");
        ok(&s3blk(&[], &["volume", "import", &v, zeros.to_str().expect("path")]));
        assert!(export(&[&v, "--snapshot", "s1"]) == data, "{codec}: the snapshot differs");
        ok(&s3blk(&[], &["volume", "clone", &format!("{v}@s1"), &c]));
        let json: serde_json::Value =
            serde_json::from_str(&ok(&s3blk(&[], &["volume", "inspect", &c, "--json"]))).expect("inspect json");
        assert_eq!(json["compression"], codec, "a clone keeps its source's compression: {json}");
        assert!(export(&[&c]) == data, "{codec}: the clone differs");
        // The clone's own writes: text over the noise of its second MiB.
        let mut over = data[..1 << 20].to_vec();
        over.truncate(600_000);
        let over_file = dir.path().join("over");
        std::fs::write(&over_file, &over).expect("over");
        let mut want = data.clone();
        want[..over.len()].copy_from_slice(&over);
        ok(&s3blk(&[], &["volume", "import", &c, over_file.to_str().expect("path")]));
        assert!(export(&[&c]) == want, "{codec}: the clone after its write differs");
        for vol in [&v, &c] {
            let fsck: serde_json::Value =
                serde_json::from_str(&ok(&s3blk(&[], &["fsck", vol, "--json"]))).expect("fsck json");
            assert_eq!(fsck["clean"], true, "{fsck}");
        }
        let bad = s3blk(&[], &["volume", "create", &path("x"), "--size", "1MiB", "--compression", "gzip"]);
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(bad.status.code() == Some(2) && err.contains("\"gzip\" (lz4, zstd or none)"), "{err}");
        one_line_error(&s3blk(&[], &["volume", "import", &v, inp, "--compression", codec]), "cannot be changed");
    }
}

/// Every file under `dir` whose bytes hold `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_holding(&p, needle));
        } else if std::fs::read(&p).expect("read").windows(needle.len()).any(|w| w == needle) {
            out.push(p.display().to_string());
        }
    }
    out
}

/// An encrypted volume through every CLI path, with the key in a file
/// (`--key-file`) or named by S3BLK_KEY_FILE: create with --encrypt,
/// import, export, snapshot, clone (encrypted with the same key), fsck;
/// inspect names the key and never holds it; no file of the store holds
/// the plaintext. Without the key, or with another, each command fails
/// with one line that says so; rekey moves the volume to a new key.
#[test]
fn encrypted_volumes_through_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    std::fs::create_dir(&store).expect("store dir");
    let path = |n: &str| store.join(n).display().to_string();
    let (v, c) = (path("v"), path("c"));
    let key_file = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).expect("key file");
        p.display().to_string()
    };
    // The same 32 bytes, hex and base64; another key; a passphrase.
    let k1 = key_file("k1", &format!("{}\n", "5a".repeat(32)));
    let k1_b64 = key_file("k1.b64", "WlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlo=");
    let k2 = key_file("k2", &"a7".repeat(32));
    let weak = key_file("weak", "hunter2");
    let data = mixed_data();
    let input = dir.path().join("in");
    std::fs::write(&input, &data).expect("input");
    let inp = input.to_str().expect("path");
    let with = |key: &str, args: &[&str]| s3blk(&[], &[&["--key-file", key], args].concat());
    let env = |key: &str| vec![("S3BLK_KEY_FILE", key.to_string())];

    one_line_error(&s3blk(&[], &["volume", "create", &v, "--size", "4MiB", "--encrypt"]), "--encrypt needs a key");
    one_line_error(&with(&weak, &["volume", "create", &v, "--size", "4MiB", "--encrypt"]), "32 bytes");
    let out = ok(&with(&k1, &["volume", "create", &v, "--size", "4MiB", "--chunk-size", "256KiB", "--encrypt"]));
    let json: serde_json::Value =
        serde_json::from_str(&ok(&with(&k1, &["volume", "inspect", &v, "--json"]))).expect("inspect json");
    let id = json["key_id"].as_str().expect("a key id").to_string();
    assert!(out.contains(&format!("encrypted with key {id}")), "{out}");
    assert_eq!((json["encrypted"].as_bool(), json["format_version"].as_u64()), (Some(true), Some(6)), "{json}");
    assert!(!json.to_string().contains(&"5a".repeat(8)), "inspect never shows the key: {json}");
    ok(&s3blk(&env(&k1_b64), &["volume", "import", &v, inp]));
    let export = |key: &str, args: &[&str]| {
        let out = with(key, &[&["volume", "export"], args, &["-"]].concat());
        ok(&out);
        out.stdout
    };
    assert!(export(&k1, &[&v]) == data, "the export differs");
    ok(&with(&k1, &["volume", "snapshot", &v, "s1"]));
    ok(&with(&k1, &["volume", "clone", &format!("{v}@s1"), &c]));
    assert!(export(&k1, &[&c]) == data, "the clone differs");
    for vol in [&v, &c] {
        let fsck: serde_json::Value =
            serde_json::from_str(&ok(&with(&k1, &["fsck", vol, "--json"]))).expect("fsck json");
        assert_eq!(fsck["clean"], true, "{fsck}");
    }
    let text = ok(&with(&k1, &["volume", "inspect", &c]));
    assert!(text.contains(&format!("encryption:    xchacha20poly1305 (key {id}")), "{text}");
    let holding = files_holding(&store, b"checkpoint written");
    assert!(holding.is_empty(), "plaintext in {holding:?}");

    // No key, another key: one line each, naming what to do.
    for args in [&["volume", "export", v.as_str(), "-"][..], &["fsck", &v], &["volume", "snapshot", &v, "s2"]] {
        one_line_error(&s3blk(&[], args), "--key-file");
        one_line_error(&with(&k2, args), "wrong key for volume");
    }
    one_line_error(&with(&k2, &["volume", "clone", &v, &path("c2")]), "wrong key for volume");
    // Without the key, inspect names the key; a clone writes nothing into the source.
    one_line_error(&s3blk(&[], &["volume", "inspect", &v]), &format!("is encrypted (key {id})"));
    one_line_error(
        &s3blk(&[], &["volume", "clone", &format!("{v}@s1"), &path("c3")]),
        &format!("is encrypted (key {id})"),
    );
    assert!(!store.join("v/snapshots/clone-c3.json").exists() && !store.join("v/clones/c3.json").exists());
    // Rekey: then only the new key opens it; the clone keeps its own wrapping.
    one_line_error(&with(&k2, &["volume", "rekey", &v, "--new-key-file", &k2]), "wrong key for volume");
    let out = ok(&with(&k1, &["volume", "rekey", &v, "--new-key-file", &k2]));
    assert!(out.contains("now opens with key") && out.contains(&format!("key {id} no longer opens it")), "{out}");
    one_line_error(&with(&k1, &["volume", "export", &v, "-"]), "wrong key for volume");
    assert!(export(&k2, &[&v]) == data, "the export after the rekey differs");
    assert!(export(&k1, &[&c]) == data, "the clone still opens with its key");
    // Flattened (its volume.json changes, under its tag), it reads the same.
    one_line_error(&s3blk(&[], &["volume", "flatten", &c]), "--key-file");
    ok(&with(&k1, &["volume", "flatten", &c]));
    assert!(export(&k1, &[&c]) == data, "the flattened clone differs");
    let fsck: serde_json::Value = serde_json::from_str(&ok(&with(&k1, &["fsck", &c, "--json"]))).expect("fsck json");
    assert_eq!(fsck["clean"], true, "{fsck}");
    // Listing needs no key (an encrypted volume's size is its size at
    // creation there), nor does deleting; a key given for a volume that is
    // not encrypted is not used, and says so.
    let listed = ok(&s3blk(&[], &["volume", "list", store.to_str().expect("path")]));
    assert!(listed.contains("\nv ") && listed.contains("\nc "), "{listed}");
    ok(&s3blk(&[], &["volume", "create", &path("plain"), "--size", "1MiB"]));
    let out = with(&k1, &["volume", "inspect", &path("plain")]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not encrypted; the key is not used"), "{out:?}");
    ok(&s3blk(&[], &["volume", "delete", &c]));
}

/// Shell completions and the manual page come from the same definitions as
/// `--help`; global options are listed apart from a command's own.
#[test]
fn completions_manpage_and_help() {
    let bash = ok(&s3blk(&[], &["completions", "bash"]));
    assert!(bash.contains("_s3blk") && bash.contains("snapshot"), "{bash}");
    let check = Command::new("bash").args(["-n", "-c", &bash]).output().expect("bash -n");
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    for shell in ["zsh", "fish"] {
        assert!(!ok(&s3blk(&[], &["completions", shell])).is_empty());
    }
    let man = ok(&s3blk(&[], &["manpage"]));
    assert!(man.contains(".TH s3blk 1"), "{man}");
    for section in ["S3BLK SERVE", "S3BLK VOLUME", "S3BLK CSI-FLUSH"] {
        assert!(man.contains(section), "no {section} in the manual page");
    }
    assert!(man.contains("takeover"), "serve's own options are on the page");
    let help = ok(&s3blk(&[], &["serve", "--help"]));
    let (own, global) = help.split_once("Global options:").expect("a Global options heading");
    assert!(own.contains("--listen") && !own.contains("--retry-attempts"), "{help}");
    assert!(global.contains("--retry-attempts"), "{help}");
    // `compact` has one safety-age option (the global one, also spelt
    // --safety-age), and both spellings reach it.
    let help = ok(&s3blk(&[], &["compact", "--help"]));
    assert_eq!(help.matches("safety-age <").count(), 1, "{help}");
    let err = s3blk(&[], &["compact", "/nonexistent-s3blk-volume", "--compact-safety-age", "5 days"]);
    assert!(!err.status.success() && String::from_utf8_lossy(&err.stderr).contains("5 days"), "{err:?}");
}

/// In a bucket, clones of one source may live under different prefixes;
/// their pins and markers are named by the clone's last component, so a
/// second clone of the same name is refused instead of sharing (and later
/// deleting) the first one's pin.
#[test]
fn two_clones_of_one_name_never_share_a_pin() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let bucket = common::unique("clones");
    let Some(_store) = rt.block_on(common::s3_raw_store(&bucket)) else { return };
    let env = common::s3_env(&common::s3_endpoint().expect("endpoint"));
    let golden = format!("s3://{bucket}/golden");
    ok(&s3blk(&env, &["volume", "create", &golden, "--size", "1MiB", "--chunk-size", "64KiB"]));
    ok(&s3blk(&env, &["volume", "snapshot", &golden, "v1"]));
    ok(&s3blk(&env, &["volume", "clone", &format!("{golden}@v1"), &format!("s3://{bucket}/alice/root")]));
    one_line_error(
        &s3blk(&env, &["volume", "clone", &format!("{golden}@v1"), &format!("s3://{bucket}/bob/root")]),
        "already has a clone named root",
    );
    one_line_error(&s3blk(&env, &["volume", "clone", &golden, &format!("{golden}/snapshots")]), "inside one another");
    // The refusals wrote nothing: alice's clone still holds the source.
    one_line_error(&s3blk(&env, &["volume", "delete", &golden]), "clones");
    assert!(ok(&s3blk(&env, &["fsck", &format!("s3://{bucket}/alice/root")])).contains("clean"));
}

/// README's two set-up commands share one build: the test build (which
/// built this test) also built every unit `cargo run -- serve` needs, so a
/// fresh clone compiles once. Cargo reports each unit it would use as fresh;
/// the first one it has to compile fails the test (it is killed then, not
/// left compiling the tree).
#[test]
fn readme_commands_share_one_build() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let quick = readme.split("## Quick start").nth(1).expect("a Quick start section");
    let quick = quick.split("\n## ").next().unwrap_or(quick);
    let commands: Vec<&str> =
        quick.split("```sh\n").skip(1).filter_map(|b| b.split("```").next()).map(str::trim).collect();
    assert_eq!(commands, ["cargo run -- serve ./demo-volume --create --size 1GiB", "./tests/run.sh"], "{quick}");

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(cargo)
        .args(["build", "--offline", "--bin", "s3blk", "--message-format=json"])
        .current_dir(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run cargo build");
    let stdout = child.stdout.take().expect("stdout");
    let mut units = 0;
    let mut stale = None;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line.expect("read cargo output")) else { continue };
        if msg["reason"] == "compiler-artifact" {
            units += 1;
            if msg["fresh"] != true {
                stale = Some(msg["package_id"].to_string());
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().expect("cargo build");
    assert_eq!(stale, None, "`cargo run` would compile again what the test build compiled");
    assert!(status.success() && units > 100, "cargo build: {status:?}, {units} units");
}
