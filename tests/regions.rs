//! Regions, zones and failure: two regions on loopback, each with its own real Azurite, and
//! three castvault nodes (two in `eu` in different zones, one in `us`). A Tailscale-like client
//! tries its ordered recorder list and moves on at a refusal. Every scenario asserts that no
//! acked byte is lost and every recording ends finalized and exportable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use castvault_storage::store::RegionStore;
use common::{AckLog, Azurite, Node, V2Upload, connect_and_upload, probe_v2, start_v2};
use futures::TryStreamExt;
use serde_json::{Value, json};

/// Short leases so orphans are finalized within seconds, and long enough for a loaded test
/// machine: the Azurite of the outage scenario answered a lease renewal queued behind the
/// drain's puts in up to 2.6 s, which a 4 s lease (renewed after 1.3 s) barely survived.
const LEASE_TTL: &str = "10s";
/// Concurrent sessions per scenario, as the issue names.
const SESSIONS: usize = 50;
/// How long the store stays down in the outage scenario.
const OUTAGE: Duration = Duration::from_secs(60);
/// Hang guard for waits (not a performance bound: the benchmark measures).
const WAIT: Duration = Duration::from_secs(120);

struct Cluster {
    eu: Azurite,
    us: Azurite,
    eu1: Node,
    eu2: Node,
    us1: Node,
    _dirs: Vec<tempfile::TempDir>,
}

fn node_config(
    dir: &Path,
    node: &str,
    region: &str,
    zone: &str,
    cluster: (&Azurite, &Azurite),
    outage: &str,
) -> String {
    let (eu, us) = cluster;
    let text = format!(
        r#"node_id = "{node}"
region = "{region}"
zone = "{zone}"
ack = "storage"
storage_outage = "{outage}"
lease_ttl = "{LEASE_TTL}"
drain_timeout = "2s"
upload_grace = "2s"

[chunk]
max_age = "300ms"

[regions.eu]
store = "az://recordings"
store_options = {eu_options}

[regions.us]
store = "az://recordings"
store_options = {us_options}

[[routing]]
region = "eu"
src_node_tags = ["tag:eu"]

[[routing]]
region = "us"
src_node_tags = ["tag:us"]
"#,
        eu_options = eu.store_options_toml(),
        us_options = us.store_options_toml(),
    );
    let path = dir.join("castvault.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

impl Cluster {
    /// `outages`: the storage outage policy of eu1 and eu2.
    async fn start(outages: (&str, &str)) -> Self {
        let (eu, us) = tokio::join!(Azurite::start(), Azurite::start());
        eu.create_container("recordings").await;
        us.create_container("recordings").await;
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let cfg = |i: usize, node: &str, region: &str, zone: &str, outage: &str| {
            node_config(dirs[i].path(), node, region, zone, (&eu, &us), outage)
        };
        let (c1, c2, c3) = (
            cfg(0, "eu-1", "eu", "eu-1a", outages.0),
            cfg(1, "eu-2", "eu", "eu-1b", outages.1),
            cfg(2, "us-1", "us", "us-1a", "degrade"),
        );
        let (a1, a2, a3) = (["--config", &c1], ["--config", &c2], ["--config", &c3]);
        let (eu1, eu2, us1) = tokio::join!(
            Node::start(dirs[0].path(), &a1, &[]),
            Node::start(dirs[1].path(), &a2, &[]),
            Node::start(dirs[2].path(), &a3, &[]),
        );
        Self {
            eu,
            us,
            eu1,
            eu2,
            us1,
            _dirs: dirs,
        }
    }
}

fn header(client: &str, tags: &[&str]) -> Vec<u8> {
    let mut line = serde_json::to_vec(&json!({
        "version": 2, "width": 80, "height": 24, "timestamp": 1_700_000_000,
        "srcNode": client, "srcNodeTags": tags, "sshUser": "root",
    }))
    .unwrap();
    line.push(b'\n');
    line
}

fn line(t: f64, client: &str, n: usize) -> Vec<u8> {
    let mut l = serde_json::to_vec(&json!([
        t,
        "o",
        format!("{client} line {n} {}\r\n", "x".repeat(120))
    ]))
    .unwrap();
    l.push(b'\n');
    l
}

/// Opens a session like a Tailscale client: the first recorder in order that accepts v2.
async fn open(addrs: &[SocketAddr]) -> Option<(SocketAddr, V2Upload)> {
    for &addr in addrs {
        if probe_v2(addr).await
            && let Ok(upload) = start_v2(addr).await
        {
            return Some((addr, upload));
        }
    }
    None
}

/// One session that writes a line every `every` until `stop`, or until its recorder is gone.
struct Session {
    client: String,
    sent: Vec<u8>,
    log: AckLog,
    result: Result<(), String>,
}

async fn run_session(
    addrs: Vec<SocketAddr>,
    client: String,
    tags: Vec<&'static str>,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
    first_acked: Arc<tokio::sync::Semaphore>,
) -> Session {
    let (_, mut upload) = open(&addrs)
        .await
        .expect("no recorder accepted the session");
    let mut sent = header(&client, &tags);
    upload.send(&sent).await.unwrap();
    let mut n = 0;
    let mut signalled = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
        let l = line(n as f64 * every.as_secs_f64(), &client, n);
        if upload.send(&l).await.is_err() || upload.log.lock().unwrap().error.is_some() {
            break;
        }
        sent.extend_from_slice(&l);
        n += 1;
        if !signalled && upload.last_ack() > 0 && upload.last_ack() as usize >= sent.len() / 2 {
            signalled = true;
            first_acked.add_permits(1);
        }
    }
    if !signalled {
        first_acked.add_permits(1);
    }
    let (result, log) = upload.finish().await;
    Session {
        client,
        sent,
        log,
        result,
    }
}

fn spawn_sessions(
    n: usize,
    prefix: &str,
    addrs: &[SocketAddr],
    tags: &[&'static str],
    every: Duration,
    stop: &tokio_util::sync::CancellationToken,
) -> (
    Vec<tokio::task::JoinHandle<Session>>,
    Arc<tokio::sync::Semaphore>,
) {
    let acked = Arc::new(tokio::sync::Semaphore::new(0));
    let tasks = (0..n)
        .map(|i| {
            tokio::spawn(run_session(
                addrs.to_vec(),
                format!("{prefix}-{i}"),
                tags.to_vec(),
                every,
                stop.clone(),
                acked.clone(),
            ))
        })
        .collect();
    (tasks, acked)
}

/// Waits until every session has seen acks for some of its lines.
async fn wait_acked(acked: &tokio::sync::Semaphore, n: usize) {
    let permits = tokio::time::timeout(WAIT, acked.acquire_many(n as u32))
        .await
        .expect("sessions never got acks");
    permits.unwrap().forget();
}

/// Catalog rows of every region, read from the stores by the CLI (no node's cache).
async fn finalized_rows(node: &Node, prefix: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let rows: Vec<Value> = node
            .list()
            .into_iter()
            .filter(|r| {
                r["status"] != "live"
                    && r["srcNode"]
                        .as_str()
                        .or(r["src_node"].as_str())
                        .is_some_and(|s| s == prefix || s.starts_with(&format!("{prefix}-")))
            })
            .collect();
        if rows.len() >= n {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} {prefix} recordings finalized",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn src_node(row: &Value) -> String {
    row["srcNode"]
        .as_str()
        .or(row["src_node"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Every session's recording holds at least its acked bytes, as a prefix of what it sent.
fn assert_nothing_acked_lost(node: &Node, rows: &[Value], sessions: &[Session], whole: bool) {
    for s in sessions {
        let row = rows
            .iter()
            .find(|r| src_node(r) == s.client)
            .unwrap_or_else(|| panic!("no recording of {}", s.client));
        let exported = node.export(row["id"].as_str().unwrap());
        let acked = s.log.acks.last().map_or(0, |a| a.1);
        assert!(
            exported.len() as u64 >= acked,
            "{}: {} bytes stored, {acked} acked",
            s.client,
            exported.len()
        );
        assert!(
            s.sent.starts_with(&exported),
            "{}: stored bytes differ from sent",
            s.client
        );
        if whole {
            assert_eq!(
                exported.len(),
                s.sent.len(),
                "{}: not all bytes stored",
                s.client
            );
        }
    }
}

async fn metric(node: &Node, name: &str) -> u64 {
    let (_, body) = common::http_get(node.web, "/metrics").await.unwrap();
    let text = String::from_utf8(body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_a_node_its_peer_finalizes_the_orphans() {
    let mut c = Cluster::start(("degrade", "degrade")).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let addrs = [c.eu1.ingest, c.eu2.ingest];
    let (tasks, acked) = spawn_sessions(
        SESSIONS,
        "kill",
        &addrs,
        &[],
        Duration::from_millis(100),
        &stop,
    );
    wait_acked(&acked, SESSIONS).await;
    let killed_at = Instant::now();
    c.eu1.kill9();
    let sessions: Vec<Session> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(
        sessions.iter().all(|s| s.result.is_err()),
        "sessions on the dead node must fail"
    );
    let rows = finalized_rows(&c.eu2, "kill", SESSIONS).await;
    eprintln!(
        "orphans finalized {:?} after the kill (lease {LEASE_TTL})",
        killed_at.elapsed()
    );
    assert!(
        rows.iter().all(|r| r["status"] == "interrupted"),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .all(|r| r["id"].as_str().unwrap().ends_with("-eu"))
    );
    assert_nothing_acked_lost(&c.eu2, &rows, &sessions, false);
    assert_eq!(
        metric(&c.eu2, "castvault_lease_takeovers_total{region=\"eu\"}").await,
        SESSIONS as u64
    );
    // No lease is left behind.
    let eu = RegionStore::open("az://recordings", &c.eu.store_options()).unwrap();
    let leases: Vec<_> = eu
        .store
        .list(Some(&"v1/live".into()))
        .try_collect()
        .await
        .unwrap();
    assert!(leases.is_empty(), "{leases:?}");
    // New sessions go to the next recorder.
    let body = [header("after", &[]), line(0.1, "after", 0)].concat();
    let (used, _, _) = connect_and_upload(&addrs, &body, 64).await.unwrap();
    assert_eq!(used, c.eu2.ingest);
    stop.cancel();

    // The dead node comes back: it finds the manifests its peer wrote, adds no chunk beside
    // them, and keeps (and shows) any spool tail those manifests do not hold.
    c.eu1.restart().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, uploads) = c.eu1.api("/api/v1/uploads").await;
        let uploads: Vec<Value> = serde_json::from_slice(&uploads).unwrap();
        if uploads.iter().all(|u| u["lease_lost"].is_string()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restarted node never settled: {uploads:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for row in &rows {
        let id = row["id"].as_str().unwrap();
        let (status, manifest) = c.eu1.api(&format!("/api/v1/recordings/{id}")).await;
        assert_eq!(status, 200);
        let manifest: Value = serde_json::from_slice(&manifest).unwrap();
        let chunk_keys = eu
            .store
            .list(None)
            .try_filter(|m| {
                futures::future::ready(
                    m.location.as_ref().contains(id)
                        && m.location
                            .filename()
                            .is_some_and(|n| n.starts_with("chunk-")),
                )
            })
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .len();
        assert_eq!(
            chunk_keys,
            manifest["chunks"].as_array().unwrap().len(),
            "{id}: chunks beside the manifest"
        );
        assert_eq!(manifest["status"], "interrupted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_outage_degrade_drains_and_fail_ends_streams() {
    let mut c = Cluster::start(("degrade", "fail")).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let every = Duration::from_millis(250);
    let (degrade, degrade_acked) =
        spawn_sessions(SESSIONS, "degrade", &[c.eu1.ingest], &[], every, &stop);
    let (fail, fail_acked) = spawn_sessions(SESSIONS, "fail", &[c.eu2.ingest], &[], every, &stop);
    wait_acked(&degrade_acked, SESSIONS).await;
    wait_acked(&fail_acked, SESSIONS).await;

    c.eu.stop();
    let outage_started = Instant::now();
    // `fail`: every stream ends with the error frame; `degrade`: not ready, acks go on.
    let fail: Vec<Session> = futures::future::join_all(fail)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for s in &fail {
        assert!(
            s.log.error.is_some(),
            "{}: no error frame: {:?}",
            s.client,
            s.result
        );
    }
    let deadline = Instant::now() + WAIT;
    while common::http_get(c.eu1.web, "/readyz").await.unwrap().0 != 503 {
        assert!(
            Instant::now() < deadline,
            "readyz stayed ready during the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Chunks that come due during the outage are compressed into the spool meanwhile.
    while metric(&c.eu1, "castvault_spool_staged_bytes").await == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing staged during the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, uploads) = c.eu1.api("/api/v1/uploads").await;
    let uploads: Vec<Value> = serde_json::from_slice(&uploads).unwrap();
    assert!(
        uploads
            .iter()
            .any(|u| u["store_up"] == false && u["last_error"].is_string()),
        "{uploads:?}"
    );
    assert!(
        uploads
            .iter()
            .any(|u| u["staged_chunks"].as_u64() > Some(0)),
        "{uploads:?}"
    );
    tokio::time::sleep(OUTAGE.saturating_sub(outage_started.elapsed())).await;
    c.eu.resume().await;
    // Let the degrade sessions run on a little past the outage, then end them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let degrade: Vec<Session> = futures::future::join_all(degrade)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for s in &degrade {
        assert!(s.result.is_ok(), "{}: {:?}", s.client, s.result);
        let acked = s.log.acks.last().map_or(0, |a| a.1);
        assert_eq!(acked, s.sent.len() as u64, "{}: final ack short", s.client);
    }
    let rows = finalized_rows(&c.eu1, "degrade", SESSIONS).await;
    assert!(rows.iter().all(|r| r["status"] == "complete"), "{rows:?}");
    assert_nothing_acked_lost(&c.eu1, &rows, &degrade, true);
    assert_eq!(metric(&c.eu1, "castvault_spool_staged_bytes").await, 0);
    // The leases were renewed through the outage's failures, and kept.
    assert!(metric(&c.eu1, "castvault_lease_renewals_failed_total").await > 0);
    assert!(metric(&c.eu1, "castvault_lease_renewals_total").await > 0);
    assert_eq!(
        metric(&c.eu2, "castvault_lease_takeovers_total{region=\"eu\"}").await,
        0
    );
    let rows = finalized_rows(&c.eu2, "fail", SESSIONS).await;
    assert!(
        rows.iter().all(|r| r["status"] == "interrupted"),
        "{rows:?}"
    );
    assert_nothing_acked_lost(&c.eu2, &rows, &fail, false);
    assert_eq!(common::http_get(c.eu1.web, "/readyz").await.unwrap().0, 200);
    // Nothing else was touched: us never saw these recordings.
    let _ = &c.us1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routing_keeps_each_region_in_its_store_and_every_node_serves_all() {
    let c = Cluster::start(("degrade", "degrade")).await;
    // tag:eu sent to the us node lands in eu; tag:us sent to an eu node lands in us; untagged
    // stays in the receiving node's region.
    let cases = [
        ("to-us-tag-eu", c.us1.ingest, &["tag:eu"][..], "eu"),
        ("to-eu-tag-us", c.eu1.ingest, &["tag:us"][..], "us"),
        ("to-us-untagged", c.us1.ingest, &[][..], "us"),
    ];
    let mut ids = Vec::new();
    for (client, addr, tags, region) in cases {
        let body = [
            header(client, tags),
            line(0.5, client, 0),
            line(1.0, client, 1),
        ]
        .concat();
        connect_and_upload(&[addr], &body, 100).await.unwrap();
        let rows = finalized_rows(&c.eu2, client, 1).await;
        let id = rows[0]["id"].as_str().unwrap().to_owned();
        assert!(id.ends_with(&format!("-{region}")), "{client}: {id}");
        assert_eq!(c.eu2.export(&id), body, "{client}");
        ids.push((id, region, body));
    }
    let stores = [
        (
            "eu",
            RegionStore::open("az://recordings", &c.eu.store_options()).unwrap(),
        ),
        (
            "us",
            RegionStore::open("az://recordings", &c.us.store_options()).unwrap(),
        ),
    ];
    for (id, home, _) in &ids {
        for (region, store) in &stores {
            let keys: Vec<String> = store
                .store
                .list(None)
                .map_ok(|m| m.location.to_string())
                .try_collect()
                .await
                .unwrap();
            let touched = keys.iter().any(|k| k.contains(id.as_str()));
            assert_eq!(touched, region == home, "{id} in {region}: {keys:?}");
        }
    }
    // Federation: every node lists and plays every region's recordings through its API.
    for node in [&c.eu1, &c.eu2, &c.us1] {
        for (id, _, body) in &ids {
            let deadline = Instant::now() + WAIT;
            loop {
                let (status, cast) = node.api(&format!("/api/v1/recordings/{id}/cast")).await;
                if status == 200 {
                    assert_eq!(&cast, body);
                    break;
                }
                assert!(Instant::now() < deadline, "{id}: {status}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let (_, list) = node.api("/api/v1/recordings?limit=100").await;
            let list: Value = serde_json::from_slice(&list).unwrap();
            let listed = ids.iter().all(|(id, ..)| {
                list["recordings"]
                    .as_array()
                    .is_some_and(|rows| rows.iter().any(|r| r["id"] == id.as_str()))
            });
            if listed {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not every region is listed: {list}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Chunks staged in the spool during an outage live in memory and spool only: after a crash
/// they are compressed again, and the recording reaches the store whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_staged_in_an_outage_survive_a_crash() {
    let mut azurite = Azurite::start().await;
    azurite.create_container("recordings").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("castvault.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = \"solo\"\nregion = \"eu\"\nzone = \"a\"\nack = \"storage\"\nstorage_outage = \"degrade\"\nlease_ttl = \"{LEASE_TTL}\"\n\n[chunk]\nmax_bytes = 1048576\n\n[regions.eu]\nstore = \"az://recordings\"\nstore_options = {}\n",
            azurite.store_options_toml()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let mut node = Node::start(dir.path(), &["--config", &config], &[]).await;
    azurite.stop();
    let deadline = Instant::now() + WAIT;
    while common::http_get(node.web, "/readyz").await.unwrap().0 != 503 {
        assert!(Instant::now() < deadline, "readyz stayed ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = common::corpus::generate(11, 6 << 20);
    let mut upload = start_v2(node.ingest).await.unwrap();
    for piece in body.chunks(64 << 10) {
        upload.send(piece).await.unwrap();
    }
    let (result, log) = upload.finish().await;
    result.unwrap();
    assert_eq!(log.acks.last().map(|a| a.1), Some(body.len() as u64));
    let spool = dir.path().join("spool");
    let staged_files = || {
        walk(&spool)
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("staged-")
            })
            .count()
    };
    while metric(&node, "castvault_spool_staged_bytes").await == 0 || staged_files() < 5 {
        assert!(
            Instant::now() < deadline,
            "nothing staged during the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.kill9();
    assert!(staged_files() >= 5);
    // The restarted node removes them before it uploads; it is ready once its store answers.
    azurite.resume().await;
    node.restart().await;
    let rows = node.wait_finalized(1).await;
    assert_eq!(rows[0]["status"], "recovered", "{rows:?}");
    let id = rows[0]["id"].as_str().unwrap();
    assert_eq!(node.export(id), body);
    assert_eq!(metric(&node, "castvault_spool_staged_bytes").await, 0);
    assert_eq!(staged_files(), 0);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
