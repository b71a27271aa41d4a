//! Adoption: `castvault import` from a tsrecorder directory and from a tsrecorder S3 bucket on
//! a real S3-compatible server (moto), S3 as a region's store for a serving node, and
//! `castvault play` driven under tmux.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use castvault_storage::store;
use common::{BIN, Moto, Node, sha256};
use object_store::ObjectStoreExt;

/// Recordings in each generated source; the issue asks for at least 200.
const RECORDINGS: usize = 200;
const EVENTS: usize = 24;
const NODES: [&str; 3] = ["nA1b2C3CNTRL", "nD4e5F6CNTRL", "nG7h8I9CNTRL"];

/// One generated tsrecorder recording: its key below the root, and its bytes.
struct Generated {
    key: String,
    bytes: Vec<u8>,
    prod: bool,
}

/// tsrecorder-style recordings: RFC 3339 names with the fraction's trailing zeros dropped (so
/// the precision varies), headers as Tailscale SSH writes them, every third tagged `tag:prod`.
fn generate_recordings() -> Vec<Generated> {
    (0..RECORDINGS)
        .map(|i| {
            let node = NODES[i % NODES.len()];
            let start = 1_785_325_850u64 + i as u64 * 97;
            let nanos = [0u32, 33_425_744, 500_000_000, 120_000][i % 4];
            let t = time::OffsetDateTime::from_unix_timestamp(start as i64).unwrap()
                + time::Duration::nanoseconds(i64::from(nanos));
            let mut name = t
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            if nanos == 0 {
                name = name.replace(".0Z", "Z");
            }
            let prod = i % 3 == 0;
            let tags = if prod { "[\"tag:prod\"]" } else { "[\"tag:dev\"]" };
            let header = format!(
                "{{\"version\":2,\"width\":120,\"height\":40,\"timestamp\":{start},\"srcNode\":\"client-{i}.tail-net.ts.net\",\"srcNodeID\":\"nC{i}CNTRL\",\"srcNodeTags\":{tags},\"srcNodeUser\":\"user{}@example.com\",\"srcNodeUserID\":{},\"sshUser\":\"root\",\"localUser\":\"root\",\"connectionID\":\"ssh-conn-{i}\"}}\n",
                i % 7,
                9_007_199_254_740_993u64 + i as u64
            );
            let size = 2_000 + (i * 7919) % 150_000;
            let body = common::corpus::generate(i as u64, size);
            let start_of_events = body.iter().position(|&b| b == b'\n').unwrap() + 1;
            let mut bytes = header.into_bytes();
            bytes.extend_from_slice(&body[start_of_events..]);
            if i % 50 == 7 {
                // A session cut off mid-line.
                bytes.extend_from_slice(b"[99.5,\"o\",\"cut of");
            }
            Generated {
                key: format!("{node}/{name}.cast"),
                bytes,
                prod,
            }
        })
        .collect()
}

/// Kubernetes API events as tsrecorder stores them: wrapped, with their own id and destination.
fn generate_events() -> Vec<(String, Vec<u8>)> {
    (0..EVENTS)
        .map(|i| {
            let node = NODES[i % NODES.len()];
            let name = format!("2026-07-29T10:44:{:02}.{}Z", i % 60, 100 + i);
            let key = format!("{node}/events/{name}.event");
            let wrapper = serde_json::json!({
                "stableID": node,
                "event": {
                    "id": format!("{node}/events/{name}.event"),
                    "type": "request",
                    "request": {"method": "GET", "path": format!("/api/v1/namespaces/default/pods/p{i}")},
                    "user": {"username": "alice@example.com"},
                    "destination": {"node": "recorder.tail-net.ts.net", "nodeID": node},
                },
                "timestamp": format!("2026-07-29 10:44:{:02} +0000 UTC", i % 60),
            });
            (key, serde_json::to_vec(&wrapper).unwrap())
        })
        .collect()
}

fn config(
    dir: &Path,
    home_store: &str,
    home_options: &str,
    eu_store: &str,
    eu_options: &str,
) -> PathBuf {
    let text = format!(
        r#"node_id = "importer-1"
region = "us"
zone = "us-1a"
data_dir = "{data}"

[chunk]
max_bytes = 65536

[regions.us]
store = "{home_store}"
{home_options}

[regions.eu]
store = "{eu_store}"
{eu_options}

[[routing]]
region = "eu"
src_node_tags = ["tag:prod"]
"#,
        data = dir.join("data").display(),
    );
    let path = dir.join("castvault.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// One import run, `--json`: its per-object results and summary.
fn import(
    config: &Path,
    source: &str,
    extra: &[&str],
) -> (Vec<serde_json::Value>, serde_json::Value, bool) {
    let mut args = vec![
        "import",
        source,
        "--json",
        "--config",
        config.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = cli(&args);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let summary = lines.pop().expect("a summary line");
    assert_eq!(
        summary["result"],
        "summary",
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (lines, summary["totals"].clone(), out.status.success())
}

fn by_result<'a>(lines: &'a [serde_json::Value], result: &str) -> Vec<&'a serde_json::Value> {
    lines.iter().filter(|l| l["result"] == result).collect()
}

/// Exports every imported recording and compares it with its original, byte for byte.
fn assert_exports_match(config: &Path, ids: &BTreeMap<String, String>, originals: &[Generated]) {
    assert_eq!(ids.len(), originals.len());
    for g in originals {
        let id = &ids[&g.key];
        let out = cli(&[
            "export",
            id,
            "--format",
            "cast",
            "--config",
            config.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "export {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(sha256(&out.stdout), sha256(&g.bytes), "{} as {id}", g.key);
        let region = id.rsplit('-').next().unwrap();
        assert_eq!(
            region,
            if g.prod { "eu" } else { "us" },
            "{} routed by its tags",
            g.key
        );
    }
}

/// The ids a finished run reports: imported, or skipped as already imported.
fn ids_of(lines: &[serde_json::Value]) -> BTreeMap<String, String> {
    lines
        .iter()
        .filter(|l| l["key"].as_str().unwrap().ends_with(".cast"))
        .filter_map(|l| Some((l["key"].as_str()?.to_owned(), l["id"].as_str()?.to_owned())))
        .collect()
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}

fn count_files(dir: &Path, suffix: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                count_files(&p, suffix)
            } else {
                usize::from(p.to_string_lossy().ends_with(suffix))
            }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_a_tsrecorder_directory_idempotently_and_resumes_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("recordings");
    let recordings = generate_recordings();
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let write = |key: &str, bytes: &[u8], modified: SystemTime| {
        let path = src.join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(modified)
            .unwrap();
    };
    for g in &recordings {
        write(&g.key, &g.bytes, an_hour_ago);
    }
    let events = generate_events();
    for (key, bytes) in &events {
        write(key, bytes, an_hour_ago);
    }
    // tsrecorder's state directory, a session still running, one that never sent a header,
    // and a file that is not a recording.
    write("state/tailscaled.state", b"{}", an_hour_ago);
    write(
        "nA1b2C3CNTRL/2026-11-30T10:00:00Z.cast",
        b"{\"version\":2,\"width\":80,\"height\":24}\n[0.1,\"o\",\"running\"]\n",
        SystemTime::now(),
    );
    write("nA1b2C3CNTRL/2026-11-29T10:00:00Z.cast", b"", an_hour_ago);
    write(
        "nD4e5F6CNTRL/2026-11-28T10:00:00Z.cast",
        b"\x89PNG not a cast\n",
        an_hour_ago,
    );

    let us = dir.path().join("us");
    let eu = dir.path().join("eu");
    let cfg = config(
        dir.path(),
        &format!("file://{}", us.display()),
        "",
        &format!("file://{}", eu.display()),
        "",
    );
    let source = src.to_str().unwrap();

    // Run 1, killed part way: one job, so the kill lands between (or inside) recordings.
    let mut child = Command::new(BIN)
        .args([
            "import",
            source,
            "--jobs",
            "1",
            "--progress",
            "never",
            "--config",
            cfg.to_str().unwrap(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let manifests = || count_files(&us, "manifest.json") + count_files(&eu, "manifest.json");
    while manifests() < 40 {
        assert!(
            Instant::now() < deadline,
            "the first import made no progress"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the first import ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let after_kill = manifests();
    assert!(
        after_kill < RECORDINGS,
        "the kill came too late to test resuming"
    );

    // Run 2 resumes: everything not finalized before the kill, nothing twice.
    let (lines, totals, ok) = import(&cfg, source, &[]);
    assert!(!ok, "a failed object must make the exit status non-zero");
    assert_eq!(
        totals["recordings_imported"],
        (RECORDINGS - after_kill) as u64,
        "{lines:#?}"
    );
    assert_eq!(manifests(), RECORDINGS);
    let failed = by_result(&lines, "failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0]["reason"]
            .as_str()
            .unwrap()
            .contains("not an asciicast"),
        "{failed:?}"
    );
    let skipped = by_result(&lines, "skipped");
    let reason = |key: &str| {
        skipped
            .iter()
            .find(|l| l["key"] == key)
            .map(|l| l["reason"].as_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    assert!(reason("nA1b2C3CNTRL/2026-11-30T10:00:00Z.cast").contains("still being written"));
    assert!(reason("nA1b2C3CNTRL/2026-11-29T10:00:00Z.cast").contains("empty"));
    assert_eq!(totals["ignored"], 1, "the state file");

    // Run 3 imports nothing, and names every recording's id.
    let (lines, totals, _) = import(&cfg, source, &[]);
    assert_eq!(totals["recordings_imported"], 0);
    assert_eq!(totals["events_imported"], 0);
    let ids = ids_of(&lines);
    assert_exports_match(&cfg, &ids, &recordings);

    // Every event once, in the home region, keeping its original id.
    assert_eq!(count_files(&us.join("v1/events"), ".json"), EVENTS);
    assert_eq!(count_files(&eu.join("v1/events"), ".json"), 0);

    // Imported recordings verify like live ones, and say where they came from.
    for g in recordings.iter().take(3) {
        let id = &ids[&g.key];
        let out = cli(&["verify", id, "--config", cfg.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "verify {id}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = cli(&[
        "recordings",
        "list",
        "--json",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), RECORDINGS);
    assert!(rows.iter().all(|r| r["status"] == "imported"));

    // A recording that grew after it was imported (tsrecorder was still writing it) is
    // reported, not silently skipped; a recent one is still only "being written".
    let grown = &recordings[1];
    let mut bytes = grown.bytes.clone();
    bytes.extend_from_slice(b"[999.0,\"o\",\"later\"]\n");
    write(&grown.key, &bytes, an_hour_ago);
    let (lines, totals, ok) = import(&cfg, source, &[]);
    assert!(!ok);
    assert_eq!(totals["recordings_imported"], 0);
    let line = lines
        .iter()
        .find(|l| l["key"] == grown.key.as_str())
        .unwrap();
    assert_eq!(line["result"], "failed", "{line}");
    assert!(
        line["reason"]
            .as_str()
            .unwrap()
            .contains("changed since it was imported"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_a_tsrecorder_s3_bucket_into_s3_regions_that_a_node_then_serves() {
    let moto = Moto::start().await;
    for bucket in ["tsrecorder", "castvault-us", "castvault-eu"] {
        moto.create_bucket(bucket).await;
    }
    let source = store::open("s3://tsrecorder", &moto.store_options()).unwrap();
    let recordings = generate_recordings();
    let events = generate_events();
    let puts = recordings
        .iter()
        .map(|g| (g.key.clone(), g.bytes.clone()))
        .chain(events.iter().cloned())
        .chain([
            ("check-write-access".to_owned(), Vec::new()),
            (".events-exist".to_owned(), Vec::new()),
        ]);
    for (key, bytes) in puts {
        source
            .put(
                &object_store::path::Path::from(key),
                Bytes::from(bytes).into(),
            )
            .await
            .unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let options = moto.store_options_toml();
    let cfg = config(
        dir.path(),
        "s3://castvault-us",
        &format!("store_options = {options}"),
        "s3://castvault-eu",
        &format!("store_options = {options}"),
    );
    let mut source_args = Vec::new();
    for (k, v) in moto.store_options() {
        source_args.push("--source-option".to_owned());
        source_args.push(format!("{k}={v}"));
    }
    source_args.extend(["--min-age".to_owned(), "0s".to_owned()]);
    let extra: Vec<&str> = source_args.iter().map(String::as_str).collect();

    // A node whose regions are these S3 buckets, running while the import runs: it records a
    // live session into S3 like into Azure, and lists the imported recordings from the
    // import's notices within its recent catalog scan (no restart).
    let node_dir = tempfile::tempdir().unwrap();
    let node = Node::start(node_dir.path(), &["--config", cfg.to_str().unwrap()], &[]).await;

    let (lines, totals, ok) = import(&cfg, "s3://tsrecorder", &extra);
    assert!(ok, "{lines:#?}");
    assert_eq!(totals["recordings_imported"], RECORDINGS as u64);
    assert_eq!(totals["events_imported"], EVENTS as u64);
    assert_eq!(totals["ignored"], 2, "the two marker objects");
    let (lines, totals, ok) = import(&cfg, "s3://tsrecorder", &extra);
    assert!(ok);
    assert_eq!(totals["recordings_imported"], 0);
    assert_eq!(totals["events_imported"], 0);
    assert_eq!(totals["skipped"], (RECORDINGS + EVENTS) as u64);
    assert_exports_match(&cfg, &ids_of(&lines), &recordings);

    let body = common::corpus::generate(4242, 300_000);
    common::connect_and_upload(&[node.ingest], &body, 8192)
        .await
        .unwrap();
    let rows = node.wait_finalized(RECORDINGS + 1).await;
    let live: Vec<_> = rows.iter().filter(|r| r["status"] == "complete").collect();
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(
        sha256(&node.export(live[0]["id"].as_str().unwrap())),
        sha256(&body)
    );
    // The notices are read every RECENT_SCAN_EVERY (30 s).
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (status, page) = node
            .api("/api/v1/recordings?status=imported&limit=500")
            .await;
        assert_eq!(status, 200);
        let page: serde_json::Value = serde_json::from_slice(&page).unwrap();
        let listed = page["recordings"].as_array().unwrap().len();
        if listed == RECORDINGS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the running node lists {listed} of {RECORDINGS} imported recordings"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One event line of about 900 bytes that clears the screen and shows `name`, so with 1 KiB
/// chunks each screen is a chunk of its own.
fn screen_line(time: f64, name: &str) -> String {
    let filler = ".".repeat(850);
    format!("[{time},\"o\",\"\\u001b[2J\\u001b[H{name}\\r\\n{filler}\\r\\n\"]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn play_shows_a_recording_in_the_terminal_and_seeks_by_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("nPLAYCNTRL")).unwrap();
    // Screens a minute apart: played at speed 1 only a jump reaches the next in time.
    let mut cast = "{\"version\":2,\"width\":100,\"height\":30}\n".to_owned();
    for (i, name) in ["SCREEN-ONE", "SCREEN-TWO", "SCREEN-THREE"]
        .iter()
        .enumerate()
    {
        cast.push_str(&screen_line(0.1 + 60.0 * i as f64, name));
    }
    let file = src.join("nPLAYCNTRL/2026-07-01T09:00:00Z.cast");
    std::fs::write(&file, &cast).unwrap();
    let store = dir.path().join("store");
    let cfg = dir.path().join("castvault.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{}\"\nstore = \"file://{}\"\n[chunk]\nmax_bytes = 1024\n",
            dir.path().join("data").display(),
            store.display()
        ),
    )
    .unwrap();
    let (lines, totals, ok) = import(&cfg, src.to_str().unwrap(), &["--min-age", "0s"]);
    assert!(ok && totals["recordings_imported"] == 1, "{lines:?}");
    let id = lines[0]["id"].as_str().unwrap().to_owned();

    let play = |name: &str, extra: &str| {
        let command = format!(
            "{BIN} play {id} --config {} {extra}; echo play-exit=$?; sleep 60",
            cfg.display()
        );
        common::tmux::Tmux::start(name, &command)
    };

    // With the idle time cut to 0.2 s the whole recording plays and the player ends.
    let tmux = play("play-all", "-i 0.2");
    let screen = tmux.wait_for("play-exit=0");
    assert!(
        screen.contains("SCREEN-THREE") && !screen.contains("SCREEN-TWO"),
        "{screen}"
    );
    drop(tmux);

    // At speed 1: jump forward and back by chunk, pause, step, quit.
    let tmux = play("play-keys", "");
    tmux.wait_for("SCREEN-ONE");
    tmux.press("Right");
    let screen = tmux.wait_for("SCREEN-TWO");
    assert!(!screen.contains("SCREEN-ONE"), "{screen}");
    tmux.press("Left");
    let screen = tmux.wait_for("SCREEN-ONE");
    assert!(!screen.contains("SCREEN-TWO"), "{screen}");
    tmux.press("Space");
    tmux.press("Right");
    // Paused: the jump rebuilds the screen before chunk 1 (chunk 0's), and waits.
    std::thread::sleep(Duration::from_millis(800));
    let screen = tmux.screen();
    assert!(
        screen.contains("SCREEN-ONE") && !screen.contains("SCREEN-TWO"),
        "{screen}"
    );
    tmux.press(".");
    let screen = tmux.wait_for("SCREEN-TWO");
    assert!(!screen.contains("play-exit"), "{screen}");
    tmux.press("q");
    tmux.wait_for("play-exit=0");

    // SIGTERM ends playback and gives the terminal back as it was (canonical mode, echo).
    let tmux = common::tmux::Tmux::start(
        "play-term",
        &format!(
            "{BIN} play {id} --config {}; echo play-exit=$?; echo \"tty=$(stty -a | tr ' ;' '\\n\\n' | grep -x -e '-\\?icanon' -e '-\\?echo' | tr '\\n' ' ')end\"; sleep 60",
            cfg.display()
        ),
    );
    tmux.wait_for("SCREEN-ONE");
    let shell = tmux.pane_pid();
    let player = Command::new("pgrep")
        .args(["-P", &shell.to_string()])
        .output()
        .unwrap();
    let player: i32 = String::from_utf8(player.stdout)
        .unwrap()
        .trim()
        .parse()
        .expect("the player's pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(player),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let screen = tmux.wait_for("end");
    assert!(
        screen.contains("play-exit=0") && screen.contains("tty=icanon echo end"),
        "{screen}"
    );
    drop(tmux);

    // Once a node has indexed it, a jump starts from the index's snapshot: with the chunks
    // before it gone, playing from chunk 2 still works, since it reads only the manifest, the
    // index and chunk 2.
    let node_dir = tempfile::tempdir().unwrap();
    let node = Node::start(node_dir.path(), &["--config", cfg.to_str().unwrap()], &[]).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while count_files(&store, "index.json") == 0 {
        assert!(
            Instant::now() < deadline,
            "the node never indexed the recording"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(node);
    for seq in 0..2 {
        let chunk = format!("chunk-{seq:08}.zst");
        let path = find_file(&store, &chunk).unwrap();
        std::fs::remove_file(path).unwrap();
    }
    let tmux = play("play-snapshot", "--from-chunk 2 -i 0.2");
    let screen = tmux.wait_for("play-exit=0");
    assert!(screen.contains("SCREEN-THREE"), "{screen}");
    drop(tmux);

    // Errors are clear and fail the command.
    let out = cli(&[
        "play",
        "0000000000000000000000000000-us",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let out = cli(&[
        "play",
        &id,
        "--speed",
        "0",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--speed"));
}
