//! Black-box tests of the recorder: the real binary on 127.0.0.1:0, driven by a client that
//! behaves like Tailscale's (shared PROTOCOL.md), checked with `castvault export`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{
    Azurite, Node, Used, connect_and_upload, corpus, dead_addr, refusing_recorder, sha256,
    start_v2, upload_v1,
};

/// Finds the one recording whose export hashes to `digest`.
fn find_by_digest(node: &Node, rows: &[serde_json::Value], digest: &str) -> serde_json::Value {
    rows.iter()
        .find(|r| sha256(&node.export(r["id"].as_str().unwrap())) == digest)
        .cloned()
        .unwrap_or_else(|| panic!("no recording exports to {digest}"))
}

async fn tailscale_client_round_trip(node: &Node) {
    let body = corpus::generate(1, 1 << 20);
    let digest = sha256(&body);
    // Unreachable address, then a 403 recorder, then a 500 recorder, then ours (TestMultipleRecorders).
    let addrs = [
        dead_addr(),
        refusing_recorder(403).await,
        refusing_recorder(500).await,
        node.ingest,
    ];
    let (addr, used, log) = connect_and_upload(&addrs, &body, 32 << 10)
        .await
        .expect("upload failed");
    assert_eq!((addr, used), (node.ingest, Used::V2));
    assert_eq!(
        log.acks.last().unwrap().1,
        body.len() as u64,
        "final ack must cover the whole body"
    );
    assert!(log.error.is_none());

    // A client older than v1.78 speaks only v1.
    let v1_body = corpus::generate(2, 300 << 10);
    let pieces: Vec<&[u8]> = v1_body.chunks(7777).collect();
    assert_eq!(upload_v1(node.ingest, &pieces).await.unwrap(), 200);

    let rows = node.wait_finalized(2).await;
    let v2 = find_by_digest(node, &rows, &digest);
    assert_eq!(v2["status"], "complete");
    assert_eq!(v2["bytes"], body.len() as u64);
    assert_eq!(v2["srcNode"], "laptop.tail-net.ts.net");
    assert_eq!(v2["sshUser"], "alice");
    assert_eq!(v2["localUser"], "alice");
    assert_eq!(v2["connectionID"], "ssh-conn-20261125T120000-0a1b2c3d4e");
    assert_eq!(v2["srcNodeUserID"], 30_585_448_562_688_899i64);
    assert!(v2["started_at"].is_string());
    find_by_digest(node, &rows, &sha256(&v1_body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailscale_client_round_trip_on_local_store() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[], &[]).await;
    // The probe answers 404 over HTTP/1.1: only an h2 200 means v2.
    assert_eq!(
        common::http_get(node.ingest, "/v2/record").await.unwrap().0,
        405
    );
    let head = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-I"])
        .arg(format!("http://{}/v2/record", node.ingest))
        .output();
    if let Ok(out) = head {
        assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    }
    assert!(common::probe_v2(node.ingest).await);
    tailscale_client_round_trip(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailscale_client_round_trip_on_azurite_with_storage_acks() {
    let azurite = Azurite::start().await;
    azurite.create_container("recordings").await;
    let dir = tempfile::tempdir().unwrap();
    let env = azurite.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let node = Node::start(
        dir.path(),
        &["--store", "az://recordings", "--ack", "storage"],
        &env,
    )
    .await;
    tailscale_client_round_trip(&node).await;
}

/// Writes a config file into `dir` and returns its path.
fn config(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("castvault.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acked_byte() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "[chunk]\nmax_bytes = 65536\nmax_age = \"300ms\"\n",
    );
    let mut node = Node::start(dir.path(), &["--config", &cfg], &[]).await;
    let mut expected = Vec::new();
    // Kill at several points: right after the header, mid-stream after chunks were committed,
    // and after the body ended but before the client saw the end.
    for (round, (before_kill, end_body)) in
        [(600usize, false), (400 << 10, false), (200 << 10, true)]
            .into_iter()
            .enumerate()
    {
        let body = corpus::generate(10 + round as u64, before_kill);
        let mut upload = start_v2(node.ingest).await.unwrap();
        for piece in body.chunks(8 << 10) {
            upload.send(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(
            upload
                .wait_ack(body.len() as u64, Duration::from_secs(20))
                .await,
            "acks stalled"
        );
        let acked = upload.last_ack();
        if end_body {
            // END_STREAM, then kill before the response ends.
            let _ = tokio::time::timeout(Duration::from_millis(1), upload.finish()).await;
        }
        node.kill9();
        expected.push((body, acked));
        node.restart().await;
    }
    let rows = node.wait_finalized(3).await;
    for (body, acked) in expected {
        let row = rows
            .iter()
            .find(|r| {
                let exported = node.export(r["id"].as_str().unwrap());
                exported.len() as u64 >= acked && body.starts_with(&exported)
            })
            .unwrap_or_else(|| panic!("no recording holds the {acked} acked bytes"));
        assert!(
            row["status"] == "interrupted" || row["status"] == "recovered",
            "{row}"
        );
    }
    // Nothing is left in the spool once everything is finalized.
    let spool: Vec<_> = std::fs::read_dir(dir.path().join("spool"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != "journal")
        .collect();
    assert!(spool.is_empty(), "spool not emptied: {spool:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_answer_and_costs_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "max_line_bytes = 4096\n");
    let node = Node::start(dir.path(), &["--config", &cfg], &[]).await;

    // A recording in flight the whole time must be unaffected.
    let good = corpus::generate(20, 200 << 10);
    let mut bystander = start_v2(node.ingest).await.unwrap();
    bystander.send(&good[..100 << 10]).await.unwrap();

    // First line not a v2 header: 400 before storing (v1), final error frame (v2).
    assert_eq!(
        upload_v1(node.ingest, &[b"[0.1,\"o\",\"no header\"]\n"])
            .await
            .unwrap(),
        400
    );
    assert_eq!(
        upload_v1(node.ingest, &[b"{\"version\":1}\n"])
            .await
            .unwrap(),
        400
    );
    let mut v2 = start_v2(node.ingest).await.unwrap();
    v2.send(b"not json at all\n").await.unwrap();
    let (result, log) = v2.finish().await;
    assert!(result.unwrap_err().contains("invalid asciicast header"));
    assert!(log.error.is_some());

    // A line over the limit: final error frame; what came before it is kept.
    let header = format!("{}\n", corpus::header(80, 24));
    let before = format!("{header}[0.5,\"o\",\"fine\"]\n");
    let mut long = start_v2(node.ingest).await.unwrap();
    long.send(before.as_bytes()).await.unwrap();
    assert!(
        long.wait_ack(before.len() as u64, Duration::from_secs(10))
            .await
    );
    long.send(format!("[1.0,\"o\",\"{}\"]\n", "x".repeat(5000)).as_bytes())
        .await
        .unwrap();
    let (result, _) = long.finish().await;
    assert!(result.unwrap_err().contains("longer than the limit"));

    // Malformed event lines are kept byte-exact and counted; tolerant parsing of the rest.
    let odd = r#"{"version":2,"width":0,"height":0,"timestamp":1764072000,"srcNode":"k.ts.net","srcNodeID":"n","srcNodeTags":null,"srcNodeUserID":9007199254740993,"env":null,"sshUser":"","localUser":"","kubernetes":{"PodName":"web-0","Namespace":"prod","Container":"app","SessionType":"exec"},"newKey":[1]}\n[5e-07,"o","a"]\n[0.1,"r","24x80"]\nthis is not an event\n[0.2,"o","b"]\n[0.3,"o","trunc"#.replace("\\n", "\n");
    assert_eq!(
        upload_v1(node.ingest, &[odd.as_bytes()]).await.unwrap(),
        200
    );

    bystander.send(&good[100 << 10..]).await.unwrap();
    let (result, log) = bystander.finish().await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(log.acks.last().unwrap().1, good.len() as u64);

    let rows = node.wait_finalized(3).await;
    assert_eq!(
        rows.len(),
        3,
        "refused uploads must store nothing: {rows:#?}"
    );
    find_by_digest(&node, &rows, &sha256(&good));
    let long_row = rows.iter().find(|r| r["status"] == "interrupted").unwrap();
    assert!(
        node.export(long_row["id"].as_str().unwrap())
            .starts_with(before.as_bytes())
    );
    let odd_row = find_by_digest(&node, &rows, &sha256(odd.as_bytes()));
    assert_eq!(odd_row["srcNodeUserID"], 9_007_199_254_740_993i64);
    let (status, manifest) = node
        .api(&format!(
            "/api/v1/recordings/{}",
            odd_row["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, 200);
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(manifest["malformed_lines"], 1);
    assert_eq!(manifest["events"], 3);
    assert_eq!(manifest["partial_last_line"], true);
    assert_eq!(manifest["header"]["kubernetes"]["PodName"], "web-0");

    // Ids from requests never leave their prefix.
    for hostile in [
        "..%2F..%2Fetc%2Fpasswd",
        "0000000000000000000000000000-..",
        "x",
    ] {
        let (status, _) = node.api(&format!("/api/v1/recordings/{hostile}")).await;
        assert_eq!(status, 400, "{hostile}");
    }
    let out = node.cli(&["export", "../../etc/passwd"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_refuses_new_recordings_with_503() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "min_free_disk_bytes = 18446744073709551615\n");
    let node = Node::start(dir.path(), &["--config", &cfg], &[]).await;
    let header = format!("{}\n", corpus::header(80, 24));
    assert_eq!(
        upload_v1(node.ingest, &[header.as_bytes()])
            .await
            .unwrap_err(),
        "recording: unexpected status: 503"
    );
    let err = start_v2(node.ingest).await.err().unwrap();
    assert!(err.contains("503"), "{err}");
    assert!(node.list().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_events_are_stored_with_id_and_destination() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[], &[]).await;
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-I"])
        .arg(format!("http://{}/v2/event", node.ingest))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    let event = r#"{"type":"kubernetes-api-request","id":"","timestamp":1764072000,"userAgent":"kubectl/v1.36.3","request":{"method":"GET","path":"/api/v1/pods","body":"","queryParameters":{}},"kubernetes":{"Verb":"list","Resource":"pods"},"source":{"node":"laptop.ts.net","nodeID":"n1"},"destination":{"node":"","nodeID":""}}"#;
    let post = |body: &str| {
        std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
            ])
            .arg(body)
            .arg(format!("http://{}/v2/event", node.ingest))
            .output()
            .unwrap()
    };
    assert_eq!(
        String::from_utf8_lossy(&post(&format!("{event}\n")).stdout),
        "200"
    );
    assert_eq!(String::from_utf8_lossy(&post("[1,2]").stdout), "400");
    let events = dir.path().join("store/v1/events");
    let stored: Vec<_> = walk(&events);
    assert_eq!(stored.len(), 1);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&stored[0]).unwrap()).unwrap();
    let id = v["id"].as_str().unwrap();
    assert!(stored[0].ends_with(format!("{id}.json")));
    assert_eq!(v["destination"]["node"], "127.0.0.1");
    assert_eq!(v["request"]["path"], "/api/v1/pods");

    // The playback API lists the day's events (the day the event's id names).
    let day = stored[0]
        .strip_prefix(&events)
        .unwrap()
        .iter()
        .take(3)
        .map(|c| c.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("-");
    let (status, body) = node.api(&format!("/api/v1/events?day={day}")).await;
    assert_eq!(status, 200);
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(listed, vec![v.clone()]);
    assert_eq!(node.api("/api/v1/events?day=yesterday").await.0, 400);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path))
        } else {
            out.push(path)
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_v2_stream_gets_heartbeat_acks_and_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[], &[]).await;
    let header = format!("{}\n", corpus::header(80, 24));
    let mut upload = start_v2(node.ingest).await.unwrap();
    upload.send(header.as_bytes()).await.unwrap();
    assert!(
        upload
            .wait_ack(header.len() as u64, Duration::from_secs(5))
            .await
    );
    // An idle session: no bytes for a while. Frames must keep coming, and the response must not
    // end, while the body is open.
    let idle_from = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let frames: Vec<_> = upload
        .log
        .lock()
        .unwrap()
        .acks
        .iter()
        .filter(|(t, _)| *t > idle_from)
        .map(|(t, _)| *t)
        .collect();
    assert!(
        frames.len() >= 2,
        "only {} ack frames in 3.5 s of idle",
        frames.len()
    );
    let gaps = frames.windows(2).map(|w| w[1] - w[0]);
    assert!(
        gaps.clone().all(|g| g < Duration::from_secs(5)),
        "{:?}",
        gaps.collect::<Vec<_>>()
    );
    let event = b"[4.0,\"o\",\"after idle\"]\n";
    upload.send(event).await.unwrap();
    let (result, log) = upload.finish().await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(
        log.acks.last().unwrap().1,
        (header.len() + event.len()) as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(dir.path(), &[], &[]).await;
    let body = corpus::generate(30, 64 << 10);
    let pieces: Vec<&[u8]> = body.chunks(4096).collect();
    assert_eq!(upload_v1(node.ingest, &pieces).await.unwrap(), 200);
    assert!(node.terminate().success());
    // Restart: whatever the drain did not upload resumes; the recording is complete.
    let node = Node::start(dir.path(), &[], &[]).await;
    let rows = node.wait_finalized(1).await;
    assert_eq!(rows[0]["status"], "complete");
    assert_eq!(
        sha256(&node.export(rows[0]["id"].as_str().unwrap())),
        sha256(&body)
    );
}

#[test]
fn config_check_reports_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let bad = config(
        dir.path(),
        "region = \"Not A Region\"\nstore = \"ftp://x\"\n[chunk]\ncompression_level = 42\n",
    );
    let out = std::process::Command::new(common::BIN)
        .args(["config", "check", "--config", &bad])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("region") && stderr.contains("ftp") && stderr.contains("compression_level"),
        "{stderr}"
    );
    let unknown = config(dir.path(), "colour = \"blue\"\n");
    let out = std::process::Command::new(common::BIN)
        .args(["config", "check", "--config", &unknown])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("colour"));
    let good = config(
        dir.path(),
        &format!("data_dir = \"{}\"\n", dir.path().display()),
    );
    let out = std::process::Command::new(common::BIN)
        .args(["config", "check", "--config", &good])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tmpfs mounted for one test, unmounted on drop.
struct SmallDisk {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { path, _dir: dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_mid_stream_ends_with_error_frame_and_keeps_acked_bytes() {
    let disk = SmallDisk::mount("2m");
    let store = tempfile::tempdir().unwrap();
    let cfg_dir = tempfile::tempdir().unwrap();
    // The catalog (which grows with transcripts) lives off the small spool disk, as an operator
    // with a small spool disk would put it.
    let cfg = config(
        cfg_dir.path(),
        &format!(
            "min_free_disk_bytes = 524288\ncatalog = \"{}\"\n",
            cfg_dir.path().join("catalog.sqlite").display()
        ),
    );
    let store_url = format!("file://{}", store.path().display());
    let mut node = Node::start(&disk.path, &["--config", &cfg, "--store", &store_url], &[]).await;

    let body = corpus::generate(40, 4 << 20);
    let mut upload = start_v2(node.ingest).await.unwrap();
    let mut sent = 0;
    for piece in body.chunks(64 << 10) {
        if upload.send(piece).await.is_err() {
            break;
        }
        sent += piece.len();
        // Let acks keep up, as a terminal's pace would.
        tokio::time::sleep(Duration::from_millis(5)).await;
        if upload.log.lock().unwrap().error.is_some() {
            break;
        }
    }
    let acked = upload.last_ack();
    let (result, log) = upload.finish().await;
    let error = result.unwrap_err();
    assert!(error.contains("cannot store"), "{error}");
    assert!(log.error.is_some());
    assert!(
        acked > 0 && (acked as usize) < sent,
        "acked {acked} of {sent}"
    );

    // What was acked is stored, byte-exact, and the recording is finalized as interrupted.
    let rows = node.wait_finalized(1).await;
    assert_eq!(rows[0]["status"], "interrupted");
    let exported = node.export(rows[0]["id"].as_str().unwrap());
    assert!(exported.len() as u64 >= acked && body.starts_with(&exported));

    // Once the upload and a journal checkpoint freed the disk, new recordings are admitted
    // again; until then a client gets 503 and would try its next recorder.
    let small = corpus::generate(41, 10 << 10);
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        match upload_v1(node.ingest, &[&small]).await {
            Ok(200) => break,
            // Refused at admission (before 100-continue) or when the spool could not take it.
            Ok(503) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) if e.ends_with("503") && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => panic!("after the disk was freed: {other:?}"),
        }
    }
    node.kill9();
}
