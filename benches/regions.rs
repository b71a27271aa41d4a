//! Failure figures for regions and zones, on the release binary with real Azurite.
//!
//! `cargo bench --bench regions` runs both; `-- orphans` or `-- drain` runs one.
//! - orphans: two nodes of one region, 50 streams on the first; SIGKILL it and time until the
//!   second has finalized all 50 from the store (every catalog row `interrupted`), as a multiple
//!   of `lease_ttl`. Target ≤ 2.
//! - drain: Azurite is first warmed up with puts (a fresh emulator is slower at first, and the
//!   reference puts below run warm); then a node with `storage_outage = "degrade"` records 20
//!   streams of 16 MiB while it cannot reach its Azurite (a relay in between refuses it;
//!   `CASTVAULT_BENCH_OUTAGE=restart` stops Azurite instead, and the drain then meets a freshly
//!   started emulator), acked from the spool; then the store is back and the spool drains. The
//!   drain's rate in stored (compressed) bytes per second is compared with Azurite's own put
//!   rate for the same number of objects of the same mean size at 16, 32 and 64 puts at once,
//!   put through object_store and the same relay in the same run. Target ≥ 0.8. The same
//!   objects as conditional creates (how chunks are written) are measured beside them. Then the
//!   drain's own request mix (its chunks, checkpoints, manifests, seals and catalog rows as
//!   stored, each with castvault's put mode, and a lease put and deleted per recording) is put
//!   again straight through object_store, to tell the store's cost of that mix from
//!   castvault's; and Azurite's CPU seconds for the drain and for the replays.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use castvault_storage::store::RegionStore;
use common::{Azurite, Node, corpus, cpu_seconds, start_v2};
use futures::{FutureExt, StreamExt};
use object_store::ObjectStoreExt;

const LEASE_TTL_SECS: u64 = 10;
const ORPHAN_STREAMS: usize = 50;
const DRAIN_STREAMS: usize = 20;
/// Raw MiB per drain stream by default: 20 × 16 MiB = 320 MiB of terminal output, four 4 MiB
/// chunks each (a spool that filled during an outage holds long recordings, not only short
/// ones). `CASTVAULT_BENCH_DRAIN_MIB` sets another size, for a longer drain.
const DRAIN_MIB: usize = 16;
/// The uploader's concurrency (`upload::UPLOAD_CONCURRENCY`).
const PUT_CONCURRENCY: usize = 32;

fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |name: &str| filter.is_empty() || filter.iter().any(|f| name == f);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        if wants("orphans") {
            orphans().await;
        }
        if wants("drain") {
            drain().await;
        }
    });
}

fn config(dir: &Path, node: &str, zone: &str, store_options: &str) -> String {
    let text = format!(
        r#"node_id = "{node}"
region = "eu"
zone = "{zone}"
ack = "storage"
lease_ttl = "{LEASE_TTL_SECS}s"

[regions.eu]
store = "az://recordings"
store_options = {}
"#,
        store_options
    );
    let path = dir.join("castvault.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

async fn metric(node: &Node, name: &str) -> u64 {
    value(&metrics_text(node).await, name)
}

async fn metrics_text(node: &Node) -> String {
    let (_, body) = common::http_get(node.web, "/metrics").await.unwrap();
    String::from_utf8(body).unwrap()
}

fn value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// How often the drain is polled: one `/metrics` request each time, so the watching costs the
/// node and the machine little beside the drain (polling four metrics every 10 ms was 400
/// requests a second). A drain's end is seen up to this late, which counts against it.
const DRAIN_POLL: Duration = Duration::from_millis(20);

fn finalized(node: &Node) -> usize {
    node.list().iter().filter(|r| r["status"] != "live").count()
}

/// Busy and total jiffies of all CPUs.
fn machine_busy() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = cpu.iter().sum();
    let idle = cpu.get(3).copied().unwrap_or(0.0) + cpu.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

async fn orphans() {
    let azurite = Azurite::start().await;
    azurite.create_container("recordings").await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (c1, c2) = (
        config(d1.path(), "eu-1", "a", &azurite.store_options_toml()),
        config(d2.path(), "eu-2", "b", &azurite.store_options_toml()),
    );
    let mut a = Node::start(d1.path(), &["--config", &c1], &[]).await;
    let b = Node::start(d2.path(), &["--config", &c2], &[]).await;
    let mut uploads = Vec::new();
    for i in 0..ORPHAN_STREAMS {
        let mut upload = start_v2(a.ingest).await.unwrap();
        let body = corpus::generate(i as u64, 64 << 10);
        upload.send(&body).await.unwrap();
        uploads.push((upload, body.len() as u64));
    }
    for (upload, len) in &uploads {
        assert!(upload.wait_ack(*len, Duration::from_secs(60)).await);
    }
    let killed = Instant::now();
    a.kill9();
    while finalized(&b) < ORPHAN_STREAMS {
        assert!(killed.elapsed() < Duration::from_secs(LEASE_TTL_SECS * 10));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = killed.elapsed();
    let takeovers = metric(&b, "castvault_lease_takeovers_total{region=\"eu\"}").await;
    println!(
        "orphans: {ORPHAN_STREAMS} recordings finalized by the peer {:.1} s after SIGKILL; lease_ttl {LEASE_TTL_SECS} s: {:.2} x lease expiry (target <= 2); takeovers {takeovers}",
        took.as_secs_f64(),
        took.as_secs_f64() / LEASE_TTL_SECS as f64
    );
}

async fn drain() {
    let mut azurite = Azurite::start().await;
    azurite.create_container("recordings").await;
    let dir = tempfile::tempdir().unwrap();
    // The outage: by default the node is cut off from a running Azurite (a network outage, the
    // store itself unchanged); with CASTVAULT_BENCH_OUTAGE=restart the emulator is stopped and
    // started again, and the drain then meets a freshly started Node.js process (puts right
    // after a restart measured 0.6–0.7x of the warm rate the reference puts see).
    let restart = std::env::var("CASTVAULT_BENCH_OUTAGE").is_ok_and(|v| v == "restart");
    let gate =
        common::Gate::start(azurite.url.trim_start_matches("http://").parse().unwrap()).await;
    let options = azurite.store_options_via(&gate);
    let cfg = config(dir.path(), "eu-1", "a", &common::options_toml(&options));
    let node = Node::start(dir.path(), &["--config", &cfg], &[]).await;
    warm_up(&options).await;
    if restart {
        azurite.stop();
    } else {
        gate.close();
    }
    println!(
        "drain: outage by {}",
        if restart {
            "stopping Azurite"
        } else {
            "cutting the node off from Azurite"
        }
    );
    // Wait until the node has noticed, so every stream is acked from the spool.
    while common::http_get(node.web, "/readyz").await.unwrap().0 != 503 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mib = std::env::var("CASTVAULT_BENCH_DRAIN_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DRAIN_MIB);
    let bodies: Vec<Vec<u8>> = (0..DRAIN_STREAMS)
        .map(|i| corpus::generate(100 + i as u64, mib << 20))
        .collect();
    let raw: usize = bodies.iter().map(Vec::len).sum();
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|body| {
            let addr = node.ingest;
            tokio::spawn(async move {
                let mut upload = start_v2(addr).await.unwrap();
                for piece in body.chunks(32 << 10) {
                    upload.send(piece).await.unwrap();
                }
                let (result, _) = upload.finish().await;
                result.unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // Chunks come due for staging within `chunk.max_age` of the streams' end.
    let settle = Instant::now();
    let mut staged = 0;
    while settle.elapsed() < Duration::from_secs(10) {
        staged = metric(&node, "castvault_spool_staged_bytes").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        if metric(&node, "castvault_spool_staged_bytes").await == staged && staged > 0 {
            break;
        }
    }
    println!(
        "drain: {:.1} MiB compressed and staged in the spool during the outage",
        staged as f64 / 1048576.0
    );
    let stored_before = metric(&node, "castvault_bytes_stored_total").await;
    let chunks_before = metric(&node, "castvault_chunks_committed_total").await;
    let cpu_before = (cpu_seconds(&node.pid().to_string()), machine_busy());
    let azurite_pid = azurite.pid();
    let azurite_cpu = || azurite_pid.map_or(0.0, |pid| cpu_seconds(&pid.to_string()));
    let azurite_before = azurite_cpu();
    if restart {
        azurite.resume().await;
    } else {
        gate.open();
    }
    let back = Instant::now();
    let (mut noticed, mut first_commit, mut all_committed) = (None, None, None);
    loop {
        let text = metrics_text(&node).await;
        if value(&text, "castvault_recordings_finalized_total") >= DRAIN_STREAMS as u64 {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(600), "drain stalled");
        if noticed.is_none() && value(&text, "castvault_store_up{region=\"eu\"}") == 1 {
            noticed = Some(back.elapsed());
        }
        let committed = value(&text, "castvault_bytes_committed_total");
        if committed > 0 {
            first_commit.get_or_insert(back.elapsed());
        }
        if committed >= raw as u64 {
            all_committed.get_or_insert(back.elapsed());
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let took = back.elapsed();
    println!(
        "drain: store noticed back after {:?}, first chunk committed after {:?}, every chunk after {:?}, every recording finalized after {took:?}",
        noticed.unwrap_or(took),
        first_commit.unwrap_or(took),
        all_committed.unwrap_or(took)
    );
    let node_cpu = cpu_seconds(&node.pid().to_string()) - cpu_before.0;
    let azurite_drain = azurite_cpu() - azurite_before;
    let (busy, total) = machine_busy();
    let machine = (busy - cpu_before.1.0) / (total - cpu_before.1.1).max(1e-9);
    let stored = metric(&node, "castvault_bytes_stored_total").await - stored_before;
    let chunks = metric(&node, "castvault_chunks_committed_total").await - chunks_before;
    let drain_rate = stored as f64 / took.as_secs_f64();

    // Azurite's own put rate for the same objects, straight through object_store and the same
    // relay.
    let store = RegionStore::open("az://recordings", &options)
        .unwrap()
        .store;
    let size = (stored / chunks.max(1)) as usize;
    let payload = bytes::Bytes::from(corpus::generate(7, size));
    // The target's reference is plain puts; conditional creates, the mode chunks are written
    // with (they are immutable), are measured beside them.
    let (mut put_rate, mut create_rate): (f64, f64) = (0.0, 0.0);
    for (round, concurrency) in [PUT_CONCURRENCY / 2, PUT_CONCURRENCY, 2 * PUT_CONCURRENCY]
        .into_iter()
        .enumerate()
    {
        for create in [false, true] {
            let took = put_many(
                &store,
                &format!("bench/{round}-{create}"),
                chunks,
                &payload,
                concurrency,
                create,
            )
            .await;
            let rate = (size as u64 * chunks) as f64 / took.as_secs_f64();
            let what = if create {
                "conditional creates"
            } else {
                "reference puts"
            };
            println!(
                "drain: {what} at concurrency {concurrency}: {:.1} MiB/s",
                rate / 1048576.0
            );
            if create {
                create_rate = create_rate.max(rate);
            } else {
                put_rate = put_rate.max(rate);
            }
        }
    }
    let azurite_before = azurite_cpu();
    let replayed = replay_drain(&store, DRAIN_STREAMS).await;
    let azurite_replay = azurite_cpu() - azurite_before;
    println!(
        "drain: castvault used {node_cpu:.2} CPU-s during the {:.2} s drain; the machine's CPUs were {:.0}% busy",
        took.as_secs_f64(),
        machine * 100.0
    );
    let spool_rate = raw as f64 / took.as_secs_f64();
    println!(
        "drain: {DRAIN_STREAMS} recordings, {:.0} MiB of spool, {:.1} MiB stored in {chunks} chunks, drained in {:.2} s; Azurite puts of the same objects (best concurrency): {:.1} MiB/s",
        raw as f64 / 1048576.0,
        stored as f64 / 1048576.0,
        took.as_secs_f64(),
        put_rate / 1048576.0,
    );
    println!(
        "drain: spool bytes drained {:.1} MiB/s = {:.2} x the store's put rate (target >= 0.8); stored (compressed) bytes {:.1} MiB/s = {:.2} x",
        spool_rate / 1048576.0,
        spool_rate / put_rate,
        drain_rate / 1048576.0,
        drain_rate / put_rate
    );
    println!(
        "drain: stored bytes {:.2} x the store's rate for conditional creates of the same objects ({:.1} MiB/s at best)",
        drain_rate / create_rate,
        create_rate / 1048576.0
    );
    println!(
        "drain: the same objects and requests straight through object_store took {:.2} s at best; the drain took {:.2} s = {:.2} x that rate",
        replayed.as_secs_f64(),
        took.as_secs_f64(),
        replayed.as_secs_f64() / took.as_secs_f64()
    );
    println!(
        "drain: Azurite used {azurite_drain:.2} CPU-s during the drain and {azurite_replay:.2} CPU-s for the three replays"
    );
}

/// Objects of about a compressed chunk's size put before the outage, in rounds, to warm the
/// emulator up: a fresh Azurite took 0.49–0.53 s for its first 100 puts and 0.40–0.43 s for the
/// next 100. Without it the drain, which runs before any reference put, met the emulator cold
/// while the reference puts after it met it warm: the drain measured 0.89–1.05 s cold and
/// 0.70–0.77 s warm.
const WARM_UP_ROUNDS: usize = 2;

async fn warm_up(options: &std::collections::BTreeMap<String, String>) {
    let store = RegionStore::open("az://recordings", options).unwrap().store;
    let payload = bytes::Bytes::from(corpus::generate(7, 900_000));
    for round in 0..WARM_UP_ROUNDS {
        let took = put_many(
            &store,
            &format!("warm/{round}"),
            100,
            &payload,
            PUT_CONCURRENCY,
            false,
        )
        .await;
        println!(
            "drain: warm-up round {round}: 100 puts of 0.9 MB in {:.2} s",
            took.as_secs_f64()
        );
    }
}

/// Puts `count` copies of `payload` under `prefix`, `concurrency` at once, as plain puts or as
/// conditional creates (`create`, the mode castvault writes chunks with); the time taken.
async fn put_many(
    store: &std::sync::Arc<dyn object_store::ObjectStore>,
    prefix: &str,
    count: u64,
    payload: &bytes::Bytes,
    concurrency: usize,
    create: bool,
) -> Duration {
    let started = Instant::now();
    let mut puts = futures::stream::iter((0..count).map(|i| {
        let store = store.clone();
        let payload = payload.clone();
        let path = object_store::path::Path::from(format!("{prefix}/put-{i:08}"));
        async move {
            let mode = if create {
                object_store::PutMode::Create
            } else {
                object_store::PutMode::Overwrite
            };
            store
                .put_opts(&path, payload.into(), mode.into())
                .await
                .unwrap();
        }
    }))
    .buffer_unordered(concurrency);
    while puts.next().await.is_some() {}
    started.elapsed()
}

/// Puts the objects the drain stored again, straight through object_store and the same relay,
/// each the way castvault writes it (conditional create, or overwrite for catalog rows), plus
/// a lease created and deleted per recording (leases are gone after the drain, so they are not
/// listed): the store's own time for the drain's request mix, at 16, 32 and 64 requests at once.
/// Returns the best time.
async fn replay_drain(
    store: &std::sync::Arc<dyn object_store::ObjectStore>,
    recordings: usize,
) -> Duration {
    use object_store::{PutMode, PutPayload};
    let drained: Vec<(String, usize, PutMode)> = store
        .list(Some(&object_store::path::Path::from("v1")))
        .filter_map(|meta| async move {
            let meta = meta.unwrap();
            let key = meta.location.to_string();
            let name = key.rsplit('/').next().unwrap_or_default().to_owned();
            let mode = if key.starts_with("v1/catalog/") {
                PutMode::Overwrite
            } else if key.starts_with("v1/rec/")
                && (name.starts_with("chunk-")
                    || name.starts_with("checkpoint-")
                    || name.starts_with("manifest"))
            {
                PutMode::Create
            } else {
                // Keys, and index objects the indexer writes after the drain.
                return None;
            };
            Some((name, meta.size as usize, mode))
        })
        .collect()
        .await;
    let lease = vec![b'x'; 600];
    let payloads: Vec<bytes::Bytes> = drained
        .iter()
        .map(|(_, size, _)| bytes::Bytes::from(corpus::generate(9, *size)[..*size].to_vec()))
        .collect();
    println!(
        "drain: replaying {} stored objects and {recordings} leases (put and delete)",
        drained.len()
    );
    let mut best = Duration::MAX;
    for concurrency in [PUT_CONCURRENCY / 2, PUT_CONCURRENCY, 2 * PUT_CONCURRENCY] {
        let started = Instant::now();
        let objects =
            drained
                .iter()
                .zip(&payloads)
                .enumerate()
                .map(|(i, ((name, _, mode), payload))| {
                    let store = store.clone();
                    let path = object_store::path::Path::from(format!(
                        "replay/{concurrency}/{i:06}-{name}"
                    ));
                    let (payload, mode) = (payload.clone(), mode.clone());
                    async move {
                        store
                            .put_opts(&path, PutPayload::from(payload), mode.into())
                            .await
                            .unwrap();
                    }
                    .boxed()
                });
        let leases = (0..recordings).map(|i| {
            let store = store.clone();
            let path = object_store::path::Path::from(format!("replay/{concurrency}/lease-{i}"));
            let payload = bytes::Bytes::from(lease.clone());
            async move {
                store
                    .put_opts(&path, PutPayload::from(payload), PutMode::Create.into())
                    .await
                    .unwrap();
                store.delete(&path).await.unwrap();
            }
            .boxed()
        });
        let mut requests =
            futures::stream::iter(leases.chain(objects)).buffer_unordered(concurrency);
        while requests.next().await.is_some() {}
        let took = started.elapsed();
        println!(
            "drain: replay at concurrency {concurrency}: {:.2} s",
            took.as_secs_f64()
        );
        best = best.min(took);
    }
    best
}
