//! Playback benchmarks: the release `castvault` binary on 127.0.0.1 (and its catalog in
//! process), with the figures issue 3 names. `cargo bench --bench playback -- NAME` runs one of:
//! - catalog100k: 100,000 catalog rows in the store; the node's rebuild time, then listing and
//!   filtering over HTTP, p50/p95 per page for each query shape.
//! - search: full-text search over `CASTVAULT_SEARCH_GB` (default 10) GB of transcript text
//!   in the catalog (in process): load rate, database size, p50/p95 per query shape.
//! - seek: a one-hour recording of 520 MB raw; time to the first frame at minute 59 in real
//!   headless Chromium from a cold page, and the bytes a seek reads against the whole.
//! - live: bytes received to bytes shown over the live view (server-sent events), 20 s at 20
//!   events/s.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use castvault::catalog::{Catalog, Query, TranscriptLine};
use castvault_storage::keys::{ObjectKey, RecordingId, Region};
use castvault_storage::manifest::{CatalogRow, RecordingStatus};
use common::{Node, corpus, http_get_as, start_v2};
use corpus::Rng;
use serde_json::Value;

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let wants = |name: &str| filter.is_empty() || filter.iter().any(|f| name == f);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        if wants("catalog100k") {
            catalog_100k().await;
        }
        if wants("search") {
            search().await;
        }
        if wants("seek") {
            seek().await;
        }
        if wants("live") {
            live().await;
        }
    });
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn summary(mut times: Vec<Duration>) -> String {
    times.sort();
    format!(
        "p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms (n={})",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.95).as_secs_f64() * 1e3,
        times.last().unwrap().as_secs_f64() * 1e3,
        times.len()
    )
}

async fn metric(node: &Node, name: &str) -> u64 {
    let (_, body) = common::http_get(node.web, "/metrics").await.unwrap();
    let text = String::from_utf8(body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

const TAGS: [&str; 20] = [
    "tag:prod",
    "tag:dev",
    "tag:db",
    "tag:web",
    "tag:ci",
    "tag:k8s",
    "tag:eu",
    "tag:us",
    "tag:pci",
    "tag:hipaa",
    "tag:edge",
    "tag:batch",
    "tag:ml",
    "tag:cache",
    "tag:queue",
    "tag:auth",
    "tag:billing",
    "tag:search",
    "tag:infra",
    "tag:legacy",
];

/// A catalog row like production ones: 200 users, 50 nodes, up to three tags, 30 days.
fn fake_row(rng: &mut Rng, n: u64) -> CatalogRow {
    let region = Region::new("local").unwrap();
    let start = 1_761_955_200_000 + rng.below(30 * 86_400_000);
    let id = RecordingId::new(&region, start, rng.next());
    let mut row = CatalogRow::live(&id, "node-a", None);
    row.status = if n.is_multiple_of(50) {
        RecordingStatus::Interrupted
    } else {
        RecordingStatus::Complete
    };
    let user = rng.below(200);
    row.src_node = Some(format!("node-{}.tail-net.ts.net", rng.below(50)));
    row.src_node_user = Some(format!("user-{user}@example.com"));
    row.ssh_user = Some(format!("user-{user}"));
    row.local_user = Some(if rng.below(3) == 0 { "root" } else { "app" }.into());
    row.connection_id = Some(format!("conn-{n}"));
    row.src_node_tags = (0..rng.below(4))
        .map(|_| TAGS[rng.below(TAGS.len() as u64) as usize].to_owned())
        .collect();
    row.duration_seconds = rng.below(7200) as f64;
    row.bytes = rng.below(50 << 20);
    row.events = row.bytes / 100;
    row
}

async fn catalog_100k() {
    const ROWS: u64 = 100_000;
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let store = data.join("store");
    let mut rng = Rng::new(7);
    let started = Instant::now();
    for n in 0..ROWS {
        let row = fake_row(&mut rng, n);
        let id = RecordingId::parse(&row.id).unwrap();
        let path = store.join(ObjectKey::catalog(&id).to_string());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, serde_json::to_vec(&row).unwrap()).unwrap();
    }
    println!(
        "catalog100k: wrote {ROWS} catalog rows to the store in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let node = Node::start(&data, &[], &[]).await;
    while metric(&node, "castvault_catalog_recordings").await < ROWS {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "catalog100k: node start and catalog rebuilt from the store in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let token = node.admin_token();
    let get = |path: String| {
        let token = token.clone();
        let web = node.web;
        async move {
            let t = Instant::now();
            let (status, body) = http_get_as(web, &path, Some(&token)).await.unwrap();
            let took = t.elapsed();
            assert_eq!(status, 200, "{path}");
            (took, serde_json::from_slice::<Value>(&body).unwrap())
        }
    };
    let shapes = [
        ("first page, newest first", "".to_owned()),
        ("sshUser", "sshUser=user-17".to_owned()),
        (
            "srcNodeTags (two)",
            "srcNodeTags=tag:prod,tag:db".to_owned(),
        ),
        (
            "srcNode + status",
            "srcNode=node-9.tail-net.ts.net&status=complete".to_owned(),
        ),
        (
            "one day",
            "from=2025-11-10T00:00:00Z&to=2025-11-11T00:00:00Z".to_owned(),
        ),
        ("longest first", "sort=duration&order=desc".to_owned()),
        (
            "size range, by size",
            "minBytes=1000000&maxBytes=2000000&sort=bytes".to_owned(),
        ),
        (
            "rare: interrupted + root + tag",
            "status=interrupted&localUser=root&srcNodeTags=tag:pci".to_owned(),
        ),
    ];
    let mut all = Vec::new();
    for (name, query) in &shapes {
        let mut times = Vec::new();
        let mut rows = 0;
        for _ in 0..100 {
            let (took, page) = get(format!("/api/v1/recordings?{query}")).await;
            rows = page["recordings"].as_array().unwrap().len();
            times.push(took);
        }
        all.extend(times.iter().copied());
        println!(
            "catalog100k: {name:32} {rows:3} rows/page  {}",
            summary(times)
        );
    }
    // Deep pagination: page 200 costs what page 1 does (keyset cursor).
    let mut cursor = String::new();
    let mut deep = Vec::new();
    for page in 0..400 {
        let (took, body) = get(format!("/api/v1/recordings?limit=50{cursor}")).await;
        if page >= 200 {
            deep.push(took);
        }
        cursor = format!("&cursor={}", body["next"].as_str().unwrap());
    }
    all.extend(deep.iter().copied());
    println!(
        "catalog100k: {:32} {:3} rows/page  {}",
        "pages 200-400 by cursor",
        50,
        summary(deep)
    );
    println!("catalog100k: every page above: {}", summary(all));
}

const WORDS: &[&str] = &[
    "error",
    "warning",
    "info",
    "debug",
    "connection",
    "timeout",
    "request",
    "response",
    "user",
    "session",
    "kernel",
    "systemd",
    "nginx",
    "postgres",
    "redis",
    "docker",
    "kubectl",
    "deploy",
    "restart",
    "status",
    "config",
    "failed",
    "success",
    "started",
    "stopped",
    "listening",
    "port",
    "memory",
    "disk",
    "network",
    "packet",
    "retry",
    "backup",
    "snapshot",
    "volume",
    "mount",
];

/// One transcript line: a shell prompt and command, a log line, or a directory listing line.
fn transcript_line(rng: &mut Rng, i: u64) -> String {
    let w = |rng: &mut Rng| WORDS[rng.below(WORDS.len() as u64) as usize];
    match rng.below(3) {
        0 => format!(
            "user-{}@host-{}:~$ {} {} --{} {}",
            rng.below(200),
            rng.below(50),
            w(rng),
            w(rng),
            w(rng),
            rng.below(100_000)
        ),
        1 => format!(
            "2025-11-{:02}T{:02}:{:02}:{:02}Z {} pid={} {} {} {} id={:016x}",
            1 + rng.below(28),
            rng.below(24),
            rng.below(60),
            rng.below(60),
            w(rng),
            rng.below(65_536),
            w(rng),
            w(rng),
            w(rng),
            rng.next()
        ),
        _ => format!(
            "-rw-r--r-- 1 root root {:8} Nov {:2} 12:{:02} file-{i}-{}.log",
            rng.below(10_000_000),
            1 + rng.below(28),
            rng.below(60),
            w(rng)
        ),
    }
}

async fn search() {
    let gb: f64 = std::env::var("CASTVAULT_SEARCH_GB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10.0);
    let target = (gb * 1e9) as u64;
    // 1 MB of transcript per recording.
    const PER_RECORDING: u64 = 1_000_000;
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("catalog.sqlite");
    let catalog = Catalog::open(&path).unwrap();
    let mut rng = Rng::new(11);
    let recordings = target.div_ceil(PER_RECORDING);
    let started = Instant::now();
    let mut text_bytes = 0u64;
    let needle_at = recordings / 2;
    for n in 0..recordings {
        let row = fake_row(&mut rng, n);
        let id = row.id.clone();
        catalog.upsert(vec![row]).await.unwrap();
        let mut lines = Vec::new();
        let mut bytes = 0;
        let mut i = 0u64;
        while bytes < PER_RECORDING {
            let text = if n == needle_at && i == 500 {
                "root@db-prod:~# psql -c 'DROP TABLE invoices' # needle-7b3c9e".to_owned()
            } else {
                transcript_line(&mut rng, i)
            };
            bytes += text.len() as u64 + 1;
            lines.push(TranscriptLine {
                t: i as f64 * 0.5,
                text,
            });
            i += 1;
        }
        text_bytes += bytes;
        catalog.set_transcript(id, lines).await.unwrap();
        if n % 1000 == 999 {
            println!(
                "search: loaded {:.2} GB of transcript at {:.1} MB/s",
                text_bytes as f64 / 1e9,
                text_bytes as f64 / 1e6 / started.elapsed().as_secs_f64()
            );
        }
    }
    let db_bytes: u64 = std::fs::read_dir(work.path())
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    println!(
        "search: {recordings} recordings, {:.2} GB of transcript text loaded in {:.0} s ({:.1} MB/s); database {:.2} GB",
        text_bytes as f64 / 1e9,
        started.elapsed().as_secs_f64(),
        text_bytes as f64 / 1e6 / started.elapsed().as_secs_f64(),
        db_bytes as f64 / 1e9
    );
    let shapes = [
        ("rare term (one recording)", "q=needle-7b3c9e"),
        ("rare phrase", "q=DROP+TABLE+invoices"),
        ("common word", "q=postgres"),
        ("two common words", "q=kubectl+restart"),
        ("common word + sshUser", "q=timeout&sshUser=user-5"),
        ("common word + tag", "q=backup&srcNodeTags=tag:pci"),
        ("no match", "q=zzzqqqxxx"),
    ];
    let mut all = Vec::new();
    for (name, query) in shapes {
        let mut times = Vec::new();
        let mut found = 0;
        for _ in 0..30 {
            let q = Query::parse(query).unwrap();
            let t = Instant::now();
            let page = catalog
                .list(q, castvault::catalog::Scope::default())
                .await
                .unwrap();
            times.push(t.elapsed());
            found = page.recordings.len();
        }
        all.extend(times.iter().copied());
        println!(
            "search: {name:28} {found:3} recordings/page  {}",
            summary(times)
        );
    }
    println!("search: every query above: {}", summary(all));
}

/// Rewrites event times so the recording lasts `seconds`.
fn rescale(cast: &[u8], seconds: f64) -> Vec<u8> {
    let mut lines = cast.split_inclusive(|&b| b == b'\n');
    let header = lines.next().unwrap();
    let last = cast[..cast.len() - 1]
        .rsplit(|&b| b == b'\n')
        .next()
        .unwrap();
    let time = |line: &[u8]| -> f64 {
        let end = line.iter().position(|&b| b == b',').unwrap();
        std::str::from_utf8(&line[1..end]).unwrap().parse().unwrap()
    };
    let scale = seconds / time(last);
    let mut out = Vec::with_capacity(cast.len());
    out.extend_from_slice(header);
    for line in lines {
        let end = line.iter().position(|&b| b == b',').unwrap();
        out.extend_from_slice(format!("[{:.6}", time(line) * scale).as_bytes());
        out.extend_from_slice(&line[end..]);
    }
    out
}

async fn seek() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let pool = corpus::listing_pool();
    let cast = rescale(
        &corpus::generate_with(3, 520 << 20, pool.as_deref()),
        3600.0,
    );
    let raw = cast.len();
    let node = Node::start(&data, &[], &[]).await;
    let started = Instant::now();
    let mut upload = start_v2(node.ingest).await.unwrap();
    for piece in cast.chunks(256 << 10) {
        upload.send(piece).await.unwrap();
    }
    upload.finish().await.0.unwrap();
    let rows = node.wait_finalized(1).await;
    let id = rows[0]["id"].as_str().unwrap().to_owned();
    println!(
        "seek: {:.0} MB raw, one hour, ingested and finalized in {:.1} s",
        raw as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    while metric(&node, "castvault_catalog_recordings_indexed").await < 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "seek: indexed (snapshots and transcript) in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // What one seek reads: the manifest, the index and two chunks.
    let rid = RecordingId::parse(&id).unwrap();
    let store = data.join("store");
    let size =
        |p: object_store::path::Path| std::fs::metadata(store.join(p.to_string())).unwrap().len();
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(store.join(ObjectKey::manifest(&rid).to_string())).unwrap(),
    )
    .unwrap();
    let index: Value = serde_json::from_slice(
        &std::fs::read(store.join(ObjectKey::index(&rid).to_string())).unwrap(),
    )
    .unwrap();
    let at = 59.0 * 60.0;
    let snapshots = index["snapshots"].as_array().unwrap();
    let first = snapshots
        .iter()
        .rposition(|c| c["time"].as_f64().unwrap() <= at)
        .unwrap();
    let lo = snapshots[first]["offset"].as_u64().unwrap();
    let hi = snapshots
        .get(first + 2)
        .map_or(manifest["bytes"].as_u64().unwrap(), |s| {
            s["offset"].as_u64().unwrap()
        });
    let chunks = manifest["chunks"].as_array().unwrap();
    let touched: Vec<&Value> = chunks
        .iter()
        .filter(|c| {
            let start = c["offset"].as_u64().unwrap();
            start < hi && start + c["raw_len"].as_u64().unwrap() > lo
        })
        .collect();
    let chunk_bytes: u64 = touched
        .iter()
        .map(|c| c["compressed_len"].as_u64().unwrap())
        .sum();
    let whole: u64 = chunks
        .iter()
        .map(|c| c["compressed_len"].as_u64().unwrap())
        .sum();
    let read = size(ObjectKey::manifest(&rid)) + size(ObjectKey::index(&rid)) + chunk_bytes;
    println!(
        "seek: a seek to 59:00 reads manifest {} B + index {} B ({} snapshots) + {} chunk(s) {} B = {:.2} MB of {:.1} MB stored ({:.1}% of the recording; {} chunks in all)",
        size(ObjectKey::manifest(&rid)),
        size(ObjectKey::index(&rid)),
        snapshots.len(),
        touched.len(),
        chunk_bytes,
        read as f64 / 1e6,
        whole as f64 / 1e6,
        read as f64 * 100.0 / whole as f64,
        chunks.len()
    );
    let token = node.admin_token();
    let mut times = Vec::new();
    let mut rng = Rng::new(5);
    for _ in 0..20 {
        let from = rng.below(3600);
        let t = Instant::now();
        let (status, _) = http_get_as(
            node.web,
            &format!("/api/v1/recordings/{id}/window?from={from}"),
            Some(&token),
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        times.push(t.elapsed());
    }
    println!("seek: window API at random times: {}", summary(times));

    // The browser: a cold page (new browser context, nothing cached) opened at 59:00.
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools");
    let out = tokio::process::Command::new("node")
        .arg(tools.join("seek-bench.cjs"))
        .env("BASE_URL", format!("http://{}", node.web))
        .env("TOKEN", &token)
        .env("RECORDING", &id)
        .env("AT", at.to_string())
        .env("CHROMIUM", "/usr/bin/chromium")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

async fn live() {
    let work = tempfile::tempdir().unwrap();
    let node = Node::start(&work.path().join("data"), &[], &[]).await;
    let token = node.admin_token();
    let mut upload = start_v2(node.ingest).await.unwrap();
    upload
        .send(b"{\"version\":2,\"width\":120,\"height\":40}\n[0.0,\"o\",\"start\\r\\n\"]\n")
        .await
        .unwrap();
    let id = loop {
        let (_, body) = http_get_as(node.web, "/api/v1/recordings?status=live", Some(&token))
            .await
            .unwrap();
        let page: Value = serde_json::from_slice(&body).unwrap();
        if let Some(id) = page["recordings"][0]["id"].as_str() {
            break id.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut events = common::sse(
        node.web,
        &format!("/api/v1/recordings/{id}/live"),
        Some(&token),
    )
    .await
    .unwrap();
    events.recv().await.unwrap(); // the reset
    let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sender_log = sent.clone();
    let sender = tokio::spawn(async move {
        // 20 events/s for 20 s: a bounded loop.
        for i in 1..=400u32 {
            let line = format!("[{}.0,\"o\",\"line {i}\\r\\n\"]\n", i);
            sender_log.lock().unwrap().push(Instant::now());
            upload.send(line.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        upload.finish().await.0.unwrap();
    });
    let mut latencies = Vec::new();
    while let Some(event) = events.recv().await {
        if event.event.as_deref() == Some("done") {
            break;
        }
        let v: Value = serde_json::from_str(&event.data).unwrap();
        let i = v[0].as_f64().unwrap() as usize;
        let at = sent.lock().unwrap()[i - 1];
        latencies.push(at.elapsed());
    }
    sender.await.unwrap();
    println!(
        "live: bytes received to bytes sent to the viewer: {}",
        summary(latencies)
    );
}
