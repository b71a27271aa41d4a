//! Black-box tests of playback: the real binary on 127.0.0.1:0 receives recordings from a
//! Tailscale-like client; the catalog API, full-text search, seek windows and the UI pages are
//! checked over HTTP; the catalog is deleted and rebuilt; and real headless Chromium, driven by
//! playwright-core, filters, searches, jumps to a hit and seeks in the player.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Node, connect_and_upload, http_get_as, sha256};
use serde_json::{Value, json};

/// A line printed once, at [`NEEDLE_AT`] seconds into the long recording.
const NEEDLE: &str = "NEEDLE-pg-restart-4711";
const NEEDLE_AT: f64 = 30.0;

/// A recording of `events` output lines, 0.1 s apart, the needle printed at `NEEDLE_AT` when
/// `needle` is set.
fn recording(header: &Value, events: usize, needle: bool) -> Vec<u8> {
    let mut out = serde_json::to_vec(header).unwrap();
    out.push(b'\n');
    let user = header["sshUser"].as_str().unwrap_or("someone");
    for i in 0..events {
        let t = (i as f64) * 0.1;
        let text = if needle && (t - NEEDLE_AT).abs() < 0.05 {
            format!("\u{1b}[1;31m$ sudo systemctl restart postgres # {NEEDLE}\u{1b}[0m\r\n")
        } else {
            format!(
                "\u{1b}[32m{user}@host\u{1b}[0m:~$ echo step {i} of a long session with padding to fill chunks quickly\r\nstep {i}\r\n"
            )
        };
        out.extend_from_slice(&serde_json::to_vec(&json!([t, "o", text])).unwrap());
        out.push(b'\n');
    }
    out
}

fn header(user: &str, node: &str, tags: &[&str]) -> Value {
    json!({
        "version": 2, "width": 100, "height": 30, "timestamp": 1_764_072_000,
        "srcNode": node, "srcNodeID": "n-1", "srcNodeTags": tags,
        "srcNodeUser": format!("{user}@example.com"), "srcNodeUserID": 42,
        "sshUser": user, "localUser": "root", "connectionID": format!("conn-{user}"),
    })
}

async fn get_json(node: &Node, path: &str) -> (u16, Value) {
    let (status, body) = node.api(path).await;
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, value)
}

async fn list_ids(node: &Node, query: &str) -> Vec<String> {
    let (status, page) = get_json(node, &format!("/api/v1/recordings?{query}")).await;
    assert_eq!(status, 200, "{query}: {page}");
    page["recordings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until `n` recordings have their full index (snapshots and transcript); a recording's
/// live transcript can be searchable before that.
async fn wait_indexed(node: &Node, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = http_get_as(node.web, "/metrics", None).await.unwrap();
        let text = String::from_utf8(body).unwrap();
        let indexed: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("castvault_catalog_recordings_indexed "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if indexed >= n {
            return;
        }
        assert!(Instant::now() < deadline, "only {indexed} of {n} indexed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a search for the needle finds it (the indexer has run); returns the hits.
async fn wait_for_needle(node: &Node) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, page) = get_json(node, &format!("/api/v1/recordings?q={NEEDLE}")).await;
        assert_eq!(status, 200);
        if let Some(found) = page["recordings"].as_array().and_then(|r| r.first()) {
            return found.clone();
        }
        assert!(Instant::now() < deadline, "the needle was never indexed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn write_config(dir: &Path) -> String {
    let path = dir.join("castvault.toml");
    // Small chunks, so the long recording has many and seeking has something to skip.
    std::fs::write(&path, "[chunk]\nmax_bytes = 16384\n").unwrap();
    path.display().to_string()
}

struct Recorded {
    long_id: String,
    long_digest: String,
}

/// Three recordings: a long one by alice on db-prod (tag:prod) with the needle, and short ones
/// by bob (tag:dev) and carol (no tags).
async fn record_three(node: &Node) -> Recorded {
    let long = recording(
        &header("alice", "db-prod.tail-net.ts.net", &["tag:prod", "tag:db"]),
        1200,
        true,
    );
    let long_digest = sha256(&long);
    for body in [
        long.clone(),
        recording(
            &header("bob", "web-1.tail-net.ts.net", &["tag:dev"]),
            50,
            false,
        ),
        recording(&header("carol", "build.tail-net.ts.net", &[]), 20, false),
    ] {
        connect_and_upload(&[node.ingest], &body, 4096)
            .await
            .unwrap();
    }
    let rows = node.wait_finalized(3).await;
    let long_id = rows
        .iter()
        .find(|r| r["sshUser"] == "alice")
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .unwrap();
    Recorded {
        long_id,
        long_digest,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_search_seek_and_pages() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let mut node = Node::start(&dir.path().join("data"), &["--config", &config], &[]).await;
    let rec = record_three(&node).await;

    // Filters and pagination.
    assert_eq!(list_ids(&node, "").await.len(), 3);
    assert_eq!(list_ids(&node, "sshUser=bob").await.len(), 1);
    assert_eq!(
        list_ids(&node, "srcNodeTags=tag:prod").await,
        vec![rec.long_id.clone()]
    );
    assert_eq!(
        list_ids(&node, "srcNode=build.tail-net.ts.net").await.len(),
        1
    );
    assert_eq!(
        list_ids(&node, "srcNodeUser=carol%40example.com")
            .await
            .len(),
        1
    );
    assert_eq!(list_ids(&node, "connectionID=conn-bob").await.len(), 1);
    assert_eq!(
        list_ids(&node, "localUser=root&status=complete&region=local")
            .await
            .len(),
        3
    );
    assert_eq!(
        list_ids(&node, "minDuration=10").await,
        vec![rec.long_id.clone()]
    );
    assert_eq!(list_ids(&node, "maxBytes=5000").await.len(), 1);
    assert_eq!(
        list_ids(&node, "from=2020-01-01T00:00:00Z&to=2020-01-02T00:00:00Z")
            .await
            .len(),
        0
    );
    let mut pages = Vec::new();
    let mut path = "/api/v1/recordings?limit=1&sort=bytes&order=asc".to_owned();
    loop {
        let (_, page) = get_json(&node, &path).await;
        pages.push(
            page["recordings"][0]["sshUser"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        match page["next"].as_str() {
            Some(next) => {
                path = format!("/api/v1/recordings?limit=1&sort=bytes&order=asc&cursor={next}")
            }
            None => break,
        }
    }
    assert_eq!(pages, ["carol", "bob", "alice"]);
    for bad in [
        "limit=0",
        "limit=100000",
        "nope=1",
        "minBytes=x",
        "cursor=zz",
        "status=gone",
    ] {
        let (status, body) = get_json(&node, &format!("/api/v1/recordings?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].is_string());
    }

    // Full-text search maps the hit to the moment it was on screen.
    wait_indexed(&node, 3).await;
    let found = wait_for_needle(&node).await;
    assert_eq!(found["id"], rec.long_id.as_str());
    let hit = &found["hits"][0];
    assert!(hit["text"].as_str().unwrap().contains(NEEDLE));
    let hit_time = hit["time"].as_f64().unwrap();
    assert!(
        (NEEDLE_AT..NEEDLE_AT + 10.0).contains(&hit_time),
        "hit at {hit_time}"
    );
    assert!(
        list_ids(&node, "q=NEEDLE-pg-restart-4711&sshUser=bob")
            .await
            .is_empty()
    );

    // A seek window: the screen painted from the index, then two chunks, times rebased.
    let manifest = get_json(&node, &format!("/api/v1/recordings/{}", rec.long_id))
        .await
        .1;
    let chunks = manifest["chunks"].as_array().unwrap().len();
    assert!(
        chunks >= 6,
        "the long recording should span many chunks, got {chunks}"
    );
    let (status, body) = node
        .api(&format!(
            "/api/v1/recordings/{}/window?from=50",
            rec.long_id
        ))
        .await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    let mut lines = text.lines();
    let head: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(
        (head["width"].as_u64(), head["height"].as_u64()),
        (Some(100), Some(30))
    );
    let init: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(init[0], 0.0);
    assert!(
        init[2].as_str().unwrap().contains("step"),
        "the snapshot paints the screen"
    );
    let events: Vec<Value> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!events.is_empty());
    let window_raw: usize = text.len();
    assert!(
        window_raw < (manifest["bytes"].as_u64().unwrap() as usize) / 2,
        "a window must hold far less than the whole recording"
    );
    let (status, _) = node
        .api(&format!(
            "/api/v1/recordings/{}/window?from=oops",
            rec.long_id
        ))
        .await;
    assert_eq!(status, 400);

    // Windows splice: following `x-castvault-next` from 0 replays every event exactly once.
    let token = node.admin_token();
    let auth = format!("Bearer {token}");
    let mut from = 0.0f64;
    let mut replayed: Vec<(f64, String)> = Vec::new();
    let mut windows = 0;
    loop {
        let (status, headers, body) = common::http_get_full(
            node.web,
            &format!("/api/v1/recordings/{}/window?from={from}", rec.long_id),
            &[("authorization", &auth)],
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        windows += 1;
        let start: f64 = headers["x-castvault-window-start"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let mut lines = std::str::from_utf8(&body).unwrap().lines().skip(1);
        let init: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!((init[0].as_f64(), init[1].as_str()), (Some(0.0), Some("o")));
        if windows == 1 {
            assert!(init[2].as_str().unwrap().contains("step 0"), "{init}");
        }
        for line in lines {
            let e: Value = serde_json::from_str(line).unwrap();
            replayed.push((
                start + e[0].as_f64().unwrap(),
                e[2].as_str().unwrap().to_owned(),
            ));
        }
        match headers.get("x-castvault-next") {
            Some(next) => from = next.to_str().unwrap().parse().unwrap(),
            None => break,
        }
    }
    let exported = node.export(&rec.long_id);
    let original: Vec<(f64, String)> = std::str::from_utf8(&exported)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let e: Value = serde_json::from_str(l).unwrap();
            (e[0].as_f64().unwrap(), e[2].as_str().unwrap().to_owned())
        })
        .collect();
    assert!(
        windows > 1,
        "the long recording should take several windows"
    );
    // Events at time 0 are painted by the first window's screen; every later one is sent once.
    let original: Vec<(f64, String)> = original.into_iter().filter(|e| e.0 > 0.0).collect();
    assert_eq!(replayed.len(), original.len(), "every event exactly once");
    for (got, want) in replayed.iter().zip(&original) {
        assert_eq!(got.1, want.1);
        assert!((got.0 - want.0).abs() < 1e-5, "{} vs {}", got.0, want.0);
    }

    // Pages: the list, search hits linking to the moment, the player page, errors.
    let (status, html) = node.api("/").await;
    let html = String::from_utf8(html).unwrap();
    assert_eq!(status, 200);
    assert_eq!(html.matches("class=\"recording\"").count(), 3);
    let (_, html) = node.api(&format!("/?q={NEEDLE}&sshUser=&srcNode=")).await;
    let html = String::from_utf8(html).unwrap();
    assert!(
        html.contains(&format!("/play/{}?t=", rec.long_id)),
        "{html}"
    );
    assert!(html.contains("<mark>"));
    let (status, html) = node
        .api(&format!("/play/{}?t=31&q=postgres", rec.long_id))
        .await;
    assert_eq!(status, 200);
    let html = String::from_utf8(html).unwrap();
    assert!(html.contains("db-prod.tail-net.ts.net") && html.contains("asciinema-player.min.js"));
    // The screen at the requested moment is drawn into the page itself, before any script.
    let screen = &html[html.find("<pre class=\"screen\">").expect("a drawn screen")..];
    let screen = &screen[..screen.find("</pre>").unwrap()];
    assert!(screen.contains(NEEDLE), "{screen}");
    assert_eq!(node.api("/play/not-an-id").await.0, 400);
    assert_eq!(
        node.api("/play/0000000000000000000000000000-local").await.0,
        404
    );
    assert_eq!(node.api("/?minBytes=x").await.0, 400);
    let (status, js) = node.api("/assets/asciinema-player.min.js").await;
    assert_eq!((status, js.len()), (200, 226_742));

    // The catalog is a cache: delete it, restart, and everything (search included) is back.
    node.terminate();
    for name in ["catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm"] {
        let _ = std::fs::remove_file(dir.path().join("data").join(name));
    }
    node.restart().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while list_ids(&node, "").await.len() < 3 {
        assert!(Instant::now() < deadline, "catalog not rebuilt");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(wait_for_needle(&node).await["id"], rec.long_id.as_str());
    assert_eq!(sha256(&node.export(&rec.long_id)), rec.long_digest);
}

/// Chromium from Debian's package: the test command installs it; a missing one fails the test.
fn chromium() -> String {
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(candidate).exists() {
            return candidate.to_owned();
        }
    }
    panic!("Chromium is not installed (the test command installs Debian's chromium package)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_filters_searches_jumps_to_a_hit_and_seeks() {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools");
    assert!(
        tools.join("node_modules/playwright-core").exists(),
        "playwright-core missing: run the test command (npm ci in tests/tools)"
    );
    let chromium = chromium();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let node = Node::start(&dir.path().join("data"), &["--config", &config], &[]).await;
    let rec = record_three(&node).await;
    wait_indexed(&node, 3).await;
    wait_for_needle(&node).await;
    // A session in progress for the live view.
    let mut upload = common::start_v2(node.ingest).await.unwrap();
    let mut sent = serde_json::to_vec(&header("frank", "ops.tail-net.ts.net", &[])).unwrap();
    sent.push(b'\n');
    for i in 0..10 {
        sent.extend(event_line(
            f64::from(i) * 0.1,
            &format!("live-before-{i}\r\n"),
        ));
    }
    upload.send(&sent).await.unwrap();
    let live_id = wait_live(&node).await;

    // The screenshots are kept for people to look at after the run.
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let mut script = tokio::process::Command::new("node")
        .arg(tools.join("ui-test.cjs"))
        .env("BASE_URL", format!("http://{}", node.web))
        .env("TOKEN", node.admin_token())
        .env("NEEDLE", NEEDLE)
        .env("LONG_ID", &rec.long_id)
        .env("LIVE_ID", &live_id)
        .env("ARTIFACTS", &artifacts)
        .env("CHROMIUM", &chromium)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");
    let stdout = script.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut said = Vec::new();
    while let Ok(Some(line)) = lines.next_line().await {
        if line == "LIVE-OPENED" {
            upload
                .send(&event_line(
                    5.0,
                    "LIVE-MARKER sent after the page opened\r\n",
                ))
                .await
                .unwrap();
        }
        said.push(line);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), script.wait_with_output())
        .await
        .expect("browser test hung")
        .unwrap();
    assert!(
        out.status.success(),
        "browser test failed:\n{}\n{}",
        said.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    upload.finish().await.0.unwrap();
    assert!(artifacts.join("live.png").exists());
    assert!(artifacts.join("player.png").exists());
}

/// The binary embeds ui/vendor; it must be exactly the bundle ui/package-lock.json pins (the
/// test command runs `npm ci` in ui/ first).
#[test]
fn vendored_player_matches_the_lockfile() {
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("ui");
    let bundle = ui.join("node_modules/asciinema-player/dist/bundle");
    assert!(bundle.exists(), "run the test command (npm ci in ui/)");
    for name in ["asciinema-player.min.js", "asciinema-player.css"] {
        let vendored = std::fs::read(ui.join("vendor").join(name)).unwrap();
        let pinned = std::fs::read(bundle.join(name)).unwrap();
        assert!(
            vendored == pinned,
            "ui/vendor/{name} differs from the npm package"
        );
    }
}

fn event_line(t: f64, text: &str) -> Vec<u8> {
    let mut line = serde_json::to_vec(&json!([t, "o", text])).unwrap();
    line.push(b'\n');
    line
}

/// Waits until this node lists exactly one live recording; returns its id.
async fn wait_live(node: &Node) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(id) = list_ids(node, "status=live").await.first() {
            return id.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the recording never showed as live"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_view_splices_what_was_received_with_what_follows() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"), &[], &[]).await;
    let mut upload = common::start_v2(node.ingest).await.unwrap();
    let mut sent = serde_json::to_vec(&header("erin", "ops.tail-net.ts.net", &[])).unwrap();
    sent.push(b'\n');
    for i in 0..20 {
        sent.extend(event_line(f64::from(i) * 0.01, &format!("before-{i}\r\n")));
    }
    upload.send(&sent).await.unwrap();
    assert!(
        upload
            .wait_ack(sent.len() as u64, Duration::from_secs(10))
            .await
    );
    let id = wait_live(&node).await;

    let mut events = common::sse(
        node.web,
        &format!("/api/v1/recordings/{id}/live"),
        Some(&node.admin_token()),
    )
    .await
    .unwrap();
    let reset: Value = serde_json::from_str(&events.recv().await.unwrap().data).unwrap();
    assert_eq!(
        (reset["cols"].as_u64(), reset["rows"].as_u64()),
        (Some(100), Some(30))
    );
    assert!((reset["time"].as_f64().unwrap() - 0.19).abs() < 1e-9);
    let mut screen = avt::Terminal::new(100, 30).unwrap();
    screen.feed(reset["init"].as_str().unwrap());
    let text: Vec<String> = screen
        .screen()
        .visible_lines()
        .map(avt::Line::text)
        .collect();
    assert_eq!(
        text[19].trim_end(),
        "before-19",
        "the reset paints what was received"
    );

    // What follows arrives event by event, each exactly once, in order.
    let mut after = Vec::new();
    for j in 0..30 {
        let line = event_line(1.0 + f64::from(j) * 0.01, &format!("after-{j}\r\n"));
        upload.send(&line).await.unwrap();
        after.push(line);
    }
    let (result, _) = upload.finish().await;
    result.unwrap();
    let mut got = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("live view stalled")
            .expect("live view ended without done");
        if event.event.as_deref() == Some("done") {
            break;
        }
        let mut line = event.data.into_bytes();
        line.push(b'\n');
        got.push(line);
    }
    let parse = |l: &Vec<u8>| serde_json::from_slice::<Value>(l).unwrap();
    assert_eq!(
        got.iter().map(parse).collect::<Vec<_>>(),
        after.iter().map(parse).collect::<Vec<_>>()
    );

    // Once finalized it is no longer live here.
    node.wait_finalized(1).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.api(&format!("/api/v1/recordings/{id}/live")).await.0 != 404 {
        assert!(
            Instant::now() < deadline,
            "a finalized recording is still served live"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_roles_scopes_and_audit() {
    let dir = tempfile::tempdir().unwrap();
    let token = |t: &str| sha256(t.as_bytes());
    let config = dir.path().join("castvault.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[chunk]
max_bytes = 16384

[[access.tokens]]
name = "dev-viewer"
sha256 = "{}"
role = "viewer"
scope = {{ tags = ["tag:dev"] }}

[[access.tokens]]
name = "the-auditor"
sha256 = "{}"
role = "auditor"

[access.proxy]
header = "X-Test-User"
trusted = ["127.0.0.1/32"]

[[access.grants]]
users = ["carol@example.com"]
role = "viewer"
scope = {{ users = ["carol@example.com"] }}
"#,
            token("tok-viewer"),
            token("tok-auditor")
        ),
    )
    .unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
        &[],
    )
    .await;
    assert!(
        !dir.path().join("data/admin-token").exists(),
        "no admin token when access is configured"
    );
    let rec = record_three(&node).await;
    let as_ = |t: &'static str| {
        let web = node.web;
        move |path: String| async move {
            let (status, body) = http_get_as(web, &path, Some(t)).await.unwrap();
            (
                status,
                serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null),
            )
        }
    };
    let viewer = as_("tok-viewer");
    let auditor = as_("tok-auditor");
    let ids_of = |v: &Value| -> Vec<String> {
        v["recordings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["sshUser"].as_str().unwrap().to_owned())
            .collect()
    };

    // Nobody unauthenticated gets anything but health.
    assert_eq!(
        http_get_as(node.web, "/healthz", None).await.unwrap().0,
        200
    );
    assert_eq!(
        http_get_as(node.web, "/api/v1/recordings", None)
            .await
            .unwrap()
            .0,
        401
    );
    assert_eq!(
        http_get_as(node.web, "/api/v1/recordings", Some("wrong"))
            .await
            .unwrap()
            .0,
        401
    );
    assert_eq!(http_get_as(node.web, "/", None).await.unwrap().0, 303);

    // The auditor sees everything; wait until all three are indexed (each has "step" lines).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, page) = auditor(format!("/api/v1/recordings?q={NEEDLE}")).await;
        let (_, steps) = auditor("/api/v1/recordings?q=step".into()).await;
        if !page["recordings"].as_array().unwrap().is_empty() && ids_of(&steps).len() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "never indexed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, all) = auditor("/api/v1/recordings".into()).await;
    assert_eq!(ids_of(&all).len(), 3);
    let bob = all["recordings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["sshUser"] == "bob")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // A viewer scoped to tag:dev: list, search, id, window, live, page: only bob's.
    let (status, page) = viewer("/api/v1/recordings".into()).await;
    assert_eq!((status, ids_of(&page)), (200, vec!["bob".to_owned()]));
    let (_, page) = viewer(format!("/api/v1/recordings?q={NEEDLE}")).await;
    assert!(
        ids_of(&page).is_empty(),
        "search must not reach out of scope"
    );
    let (_, page) = viewer("/api/v1/recordings?sshUser=alice".into()).await;
    assert!(ids_of(&page).is_empty());
    let long = &rec.long_id;
    for path in [
        format!("/api/v1/recordings/{long}"),
        format!("/api/v1/recordings/{long}/window?from=0"),
        format!("/api/v1/recordings/{long}/live"),
        format!("/api/v1/recordings/{long}/cast"),
        format!("/play/{long}"),
    ] {
        assert_eq!(viewer(path.clone()).await.0, 404, "{path}");
    }
    assert_eq!(
        viewer(format!("/api/v1/recordings/{bob}/window?from=0"))
            .await
            .0,
        200
    );
    assert_eq!(viewer(format!("/play/{bob}")).await.0, 200);
    // Viewing is not exporting, and the audit log and upload state are not for viewers.
    assert_eq!(
        viewer(format!("/api/v1/recordings/{bob}/cast")).await.0,
        403
    );
    assert_eq!(viewer("/api/v1/audit".into()).await.0, 403);
    assert_eq!(viewer("/api/v1/uploads".into()).await.0, 403);

    // A login from the trusted proxy gets its grant; one without a grant gets nothing.
    let (status, body) = common::http_get_with(
        node.web,
        "/api/v1/recordings?q=step",
        &[("x-test-user", "carol@example.com")],
    )
    .await
    .unwrap();
    let page: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, ids_of(&page)), (200, vec!["carol".to_owned()]));
    let (status, _) = common::http_get_with(
        node.web,
        "/api/v1/recordings",
        &[("x-test-user", "mallory@example.com")],
    )
    .await
    .unwrap();
    assert_eq!(status, 403);

    // The auditor exports, byte-exact.
    let (status, cast) = http_get_as(
        node.web,
        &format!("/api/v1/recordings/{long}/cast"),
        Some("tok-auditor"),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(sha256(&cast), rec.long_digest);

    // Every view, search and export is in the audit log, with who, how and from where.
    let (status, log) = auditor("/api/v1/audit".into()).await;
    assert_eq!(status, 200);
    let records = log.as_array().unwrap();
    let has = |actor: &str, action: &str, id: Option<&str>| {
        records.iter().any(|r| {
            r["actor"] == actor
                && r["action"] == action
                && id.is_none_or(|id| r["recording_id"] == id)
                && r["remote"].as_str().unwrap().starts_with("127.0.0.1:")
        })
    };
    assert!(has("dev-viewer", "view", Some(&bob)));
    assert!(has("dev-viewer", "search", None));
    assert!(has("the-auditor", "export", Some(long)));
    assert!(records.iter().any(|r| r["actor"] == "carol@example.com"
        && r["via"] == "proxy"
        && r["action"] == "search"));
    assert!(
        !records
            .iter()
            .any(|r| r["actor"] == "dev-viewer" && r["recording_id"] == long.as_str()),
        "refused requests are not views"
    );
    assert_eq!(auditor("/api/v1/audit?day=20261125".into()).await.0, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_recordings_are_searchable_while_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("castvault.toml");
    std::fs::write(&config, "[chunk]\nmax_age = \"200ms\"\n").unwrap();
    let node = Node::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
        &[],
    )
    .await;
    let mut upload = common::start_v2(node.ingest).await.unwrap();
    let mut sent = serde_json::to_vec(&header("gina", "ops.tail-net.ts.net", &[])).unwrap();
    sent.push(b'\n');
    sent.extend(event_line(0.5, "$ cat /etc/LIVENEEDLE-31337.conf\r\n"));
    // Enough lines after it to scroll it off the 30-row screen into the transcript.
    for i in 0..40 {
        sent.extend(event_line(
            1.0 + f64::from(i) * 0.01,
            &format!("filler {i}\r\n"),
        ));
    }
    upload.send(&sent).await.unwrap();
    let id = wait_live(&node).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let hit = loop {
        let (_, page) = get_json(&node, "/api/v1/recordings?q=LIVENEEDLE-31337").await;
        if let Some(found) = page["recordings"].as_array().and_then(|r| r.first()) {
            break found.clone();
        }
        assert!(
            Instant::now() < deadline,
            "a recording in progress was never searchable"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(hit["id"], id.as_str());
    assert_eq!(hit["status"], "live");
    assert!(
        hit["hits"][0]["text"]
            .as_str()
            .unwrap()
            .contains("LIVENEEDLE")
    );
    // Once it ends, the full index takes over and it is still found, once.
    upload.finish().await.0.unwrap();
    node.wait_finalized(1).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, page) = get_json(&node, "/api/v1/recordings?q=LIVENEEDLE-31337").await;
        let rows = page["recordings"].as_array().unwrap();
        if rows.len() == 1
            && rows[0]["status"] == "complete"
            && rows[0]["hits"].as_array().unwrap().len() == 1
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not found once finalized: {page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
