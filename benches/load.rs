//! End-to-end load generator: the release `castvault` binary on 127.0.0.1, driven over HTTP/2
//! (h2c) exactly as Tailscale clients drive it, with the reference tools run in the same process
//! on the same corpus so figures are ratios from one run.
//!
//! `cargo bench --bench load` runs every scenario; `cargo bench --bench load -- NAME` runs one of
//! `throughput`, `streams10k`, `latency`. Scenarios:
//! - throughput: 100 MiB corpus, one stream, then 100 parallel streams of 1 MiB each, HTTP/2 →
//!   spool → zstd chunks → local store (to every recording finalized), against
//!   `zstd -3 -T1` on the same corpus; stored size against `gzip -6`; object writes per recording.
//! - streams10k: 10,000 concurrent v2 streams, each writing one event every 3 s for 30 s: the
//!   node's peak RSS and the longest any write waited for its ack.
//! - latency: 1,000 streams × 8 KiB/s at `ack = spool`: ack latency percentiles, client-side
//!   and node-side, for a 20 s steady state after a 5 s warm-up; client-side apart for the
//!   warm-up (1,000 streams open at once, and their first chunks are cut and put together) and
//!   for the last second (they all close).
//! - latency-100: the same with 100 streams, to separate load from per-write cost.
//! - size: the throughput corpus as 100 streams paced to 8 MiB/s in all (the latency
//!   scenario's load: a busy node that keeps up), stored size against `gzip -6`, and how many
//!   chunks got the thorough compression setting. `CASTVAULT_BENCH_CONFIG` names a node config
//!   file for it and for latency (`[chunk] adaptive_compression = false` for level 1 only).
//!
//! File creation on this machine depends on what was deleted lately. Its ext4 has no journal,
//! and such an ext4 skips, when it allocates an inode, every inode of the group freed within
//! the last one to five minutes, looking each up: in `/tmp`, after the test suite, creating a
//! file took 0.78 ms, in `/work` 0.04 ms (1,000 files each, same file system). The 100-stream
//! run creates over a thousand (501 store objects and their directories, and each recording's
//! spool directory and files), so a bench run right after a mass deletion in its directory's
//! group measures that: 0.64x in a fresh directory (`TMPDIR=target/bench-tmp`), 0.47x when
//! the same command ran again right after the first had deleted its files. Each run's data
//! directory is therefore kept until the scenario ends; run the bench with a `TMPDIR` that
//! has seen no mass deletion in the last five minutes, best a new top-level directory (`mkdir
//! /bench; TMPDIR=/bench`): ext4 puts a new directory below the top level, and its files, in
//! its parent's group, so a new directory next to a deleted one shares that group's skips.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Node, corpus, cpu_seconds, start_v2};

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |name: &str| filter.is_empty() || filter.iter().any(|f| name == f);
    if let Ok(path) = std::env::var("CASTVAULT_CORPUS_OUT") {
        std::fs::write(
            path,
            corpus::generate_with(42, 100 << 20, corpus::listing_pool().as_deref()),
        )
        .unwrap();
        return;
    }
    // The generator holds one connection per stream, like real clients.
    let _ =
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 65_536, 65_536);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return; // `cargo test --all-targets` runs benches as tests; this one is for `cargo bench`.
    }
    runtime.block_on(async {
        if wants("throughput") {
            throughput().await;
        }
        if wants("streams10k") {
            streams_10k().await;
        }
        if wants("size") {
            size_at_rate().await;
        }
        if wants("latency") {
            latency(1_000).await;
        }
        if wants("latency-100") {
            latency(100).await;
        }
    });
}

fn time_command(cmd: &str, input: &Path) -> (Duration, u64) {
    let start = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{cmd} < '{}' | wc -c", input.display()))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "{cmd} failed");
    (
        start.elapsed(),
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap(),
    )
}

async fn metric(node: &Node, name: &str) -> u64 {
    let (_, body) = common::http_get(node.web, "/metrics").await.unwrap();
    let text = String::from_utf8(body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

async fn wait_committed(node: &Node, bytes: u64) {
    while metric(node, "castvault_bytes_committed_total").await < bytes {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_finalized(node: &Node, n: u64) {
    while metric(node, "castvault_recordings_finalized_total").await < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn dir_size(dir: &Path, name_filter: &dyn Fn(&str) -> bool) -> (u64, u64) {
    let (mut bytes, mut files) = (0, 0);
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            let (b, f) = dir_size(&path, name_filter);
            bytes += b;
            files += f;
        } else if name_filter(&entry.file_name().to_string_lossy()) {
            bytes += entry.metadata().unwrap().len();
            files += 1;
        }
    }
    (bytes, files)
}

async fn upload(node_addr: std::net::SocketAddr, body: &[u8], piece: usize) {
    let mut up = start_v2(node_addr).await.unwrap();
    for p in body.chunks(piece) {
        up.send(p).await.unwrap();
    }
    let (result, _) = up.finish().await;
    result.unwrap();
}

/// Median of three.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The corpus cut into `n` recordings, each with the header line.
fn split_corpus(corpus_bytes: &[u8], n: usize) -> Vec<Arc<Vec<u8>>> {
    let header = format!("{}\n", corpus::header(120, 40));
    let events_start = corpus_bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
    let per = (corpus_bytes.len() - events_start) / n;
    let mut bodies = Vec::new();
    let mut at = events_start;
    while at < corpus_bytes.len() && bodies.len() < n {
        let want = (at + per).min(corpus_bytes.len());
        let end = corpus_bytes[want..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(corpus_bytes.len(), |p| want + p + 1);
        let mut body = header.clone().into_bytes();
        body.extend_from_slice(&corpus_bytes[at..end]);
        bodies.push(Arc::new(body));
        at = end;
    }
    bodies
}

/// What one ingest run measured.
struct Run {
    /// Until every byte was in a committed chunk in the store (the HTTP/2 → spool →
    /// zstd chunks → local store).
    committed: Duration,
    /// Until every recording was finalized too (manifest and catalog row written).
    finalized: Duration,
    stored: u64,
    chunks: u64,
    /// Chunks compressed with the thorough setting (the rest at the fast level).
    thorough: u64,
    other: u64,
    /// The node's data directory, deleted only when the scenario ends: deleting thousands of
    /// files right before the next run made that run's file creations slow (ext4 without a
    /// journal, as here, skips inodes freed within the last minutes when it allocates one;
    /// inode allocation was 41% of the nodes' samples in a profile from `/tmp`), which timed
    /// the bench's own cleanup instead of the node.
    _data: tempfile::TempDir,
}

impl Run {
    fn describe(&self, committed: f64, finalized: f64, reference: f64, gzip: u64) -> String {
        format!(
            "{committed:.1} MiB/s = {:.2}x committed, {:.2}x finalized, stored {} B = {:.3}x gzip -6, {} chunks ({} thorough) + {} other objects",
            committed / reference,
            finalized / reference,
            self.stored,
            self.stored as f64 / gzip as f64,
            self.chunks,
            self.thorough,
            self.other
        )
    }
}

/// Uploads `bodies` in parallel to a fresh node and waits until all are finalized.
async fn ingest_run(bodies: &[Arc<Vec<u8>>], piece: usize) -> Run {
    let data = tempfile::tempdir().unwrap();
    let node = Node::start(data.path(), &[], &[]).await;
    let total: u64 = bodies.iter().map(|b| b.len() as u64).sum();
    let node_pid = node.pid().to_string();
    let cpu_before = (cpu_seconds(&node_pid), cpu_seconds("self"));
    let start = Instant::now();
    let tasks: Vec<_> = bodies
        .iter()
        .map(|b| {
            let b = b.clone();
            let addr = node.ingest;
            tokio::spawn(async move { upload(addr, &b, piece).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = start.elapsed();
    wait_committed(&node, total).await;
    let committed = start.elapsed();
    wait_finalized(&node, bodies.len() as u64).await;
    let finalized = start.elapsed();
    let thorough = metric(&node, "castvault_chunks_compressed_thorough_total").await;
    println!(
        "  {} recording(s): all acked at {:.2} s, all chunks committed at {:.2} s, all finalized at {:.2} s; CPU used: node {:.2} s, load generator {:.2} s",
        bodies.len(),
        acked.as_secs_f64(),
        committed.as_secs_f64(),
        finalized.as_secs_f64(),
        cpu_seconds(&node_pid) - cpu_before.0,
        cpu_seconds("self") - cpu_before.1,
    );
    let store = data.path().join("store");
    let (stored, chunks) = dir_size(&store, &|n| n.starts_with("chunk-"));
    let (_, all) = dir_size(&store, &|_| true);
    Run {
        committed,
        finalized,
        stored,
        chunks,
        thorough,
        other: all - chunks,
        _data: data,
    }
}

/// The throughput and size scenarios' corpus: 100 MiB of terminal output, also written to
/// `dir` for the reference tools.
fn write_corpus(dir: &Path) -> (Vec<u8>, std::path::PathBuf) {
    let pool = corpus::listing_pool().expect("ls -laR /usr for the listing pool");
    let corpus_bytes = corpus::generate_with(42, 100 << 20, Some(&pool));
    let corpus_path = dir.join("corpus.cast");
    std::fs::write(&corpus_path, &corpus_bytes).unwrap();
    (corpus_bytes, corpus_path)
}

async fn throughput() {
    let work = tempfile::tempdir().unwrap();
    let (corpus_bytes, corpus_path) = write_corpus(work.path());
    let mib = corpus_bytes.len() as f64 / (1 << 20) as f64;
    println!(
        "corpus: {mib:.1} MiB, {} lines",
        corpus_bytes.iter().filter(|&&b| b == b'\n').count()
    );
    time_command("cat", &corpus_path);
    let (gzip_time, gzip_size) = time_command("gzip -6 -c", &corpus_path);
    println!(
        "reference gzip -6: {:.1} MiB/s, {gzip_size} bytes",
        mib / gzip_time.as_secs_f64()
    );
    let one = vec![Arc::new(corpus_bytes.clone())];
    let hundred = split_corpus(&corpus_bytes, 100);
    // Rounds alternate the reference and our runs so machine noise hits both alike.
    let mut rates: Vec<[f64; 5]> = Vec::new();
    let mut runs = Vec::new();
    for round in 1..=3 {
        let (zstd_time, zstd_size) = time_command("zstd -q -3 -T1 -c", &corpus_path);
        let one_run = ingest_run(&one, 64 << 10).await;
        let par_run = ingest_run(&hundred, 32 << 10).await;
        let rate = |t: Duration| mib / t.as_secs_f64();
        let r = [
            rate(zstd_time),
            rate(one_run.committed),
            rate(one_run.finalized),
            rate(par_run.committed),
            rate(par_run.finalized),
        ];
        println!(
            "round {round}: zstd -3 -T1 {:.1} MiB/s ({zstd_size} B); one stream {}; 100 streams {}",
            r[0],
            one_run.describe(r[1], r[2], r[0], gzip_size),
            par_run.describe(r[3], r[4], r[0], gzip_size),
        );
        rates.push(r);
        runs.extend([one_run, par_run]);
    }
    let med = |i: usize| median(rates.iter().map(|r| r[i]).collect());
    let reference = med(0);
    println!(
        "median of 3: zstd -3 -T1 {reference:.1} MiB/s; one stream {:.2}x committed, {:.2}x finalized; 100 streams {:.2}x committed, {:.2}x finalized",
        med(1) / reference,
        med(2) / reference,
        med(3) / reference,
        med(4) / reference
    );
}

/// Aggregate rate of the size scenario: the latency scenario's 1,000 streams x 8 KiB/s.
const SIZE_RATE: usize = 8 << 20;
/// Bytes each stream of the size scenario writes at once.
const SIZE_PIECE: usize = 16 << 10;

async fn size_at_rate() {
    let work = tempfile::tempdir().unwrap();
    let (corpus_bytes, corpus_path) = write_corpus(work.path());
    let (_, gzip_size) = time_command("gzip -6 -c", &corpus_path);
    let bodies = split_corpus(&corpus_bytes, 100);
    let data = tempfile::tempdir().unwrap();
    let config = std::env::var("CASTVAULT_BENCH_CONFIG").ok();
    let args: Vec<&str> = config
        .iter()
        .flat_map(|c| ["--config", c.as_str()])
        .collect();
    let node = Node::start(data.path(), &args, &[]).await;
    let node_pid = node.pid().to_string();
    let cpu_before = cpu_seconds(&node_pid);
    // Each stream writes a piece every `every`, so that all together send SIZE_RATE.
    let every = Duration::from_secs_f64((bodies.len() * SIZE_PIECE) as f64 / SIZE_RATE as f64);
    let start = Instant::now();
    let tasks: Vec<_> = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| {
            let body = body.clone();
            let addr = node.ingest;
            tokio::spawn(async move {
                tokio::time::sleep(every.mul_f64(i as f64 / 100.0)).await;
                let mut up = start_v2(addr).await.unwrap();
                let mut tick = tokio::time::interval(every);
                for piece in body.chunks(SIZE_PIECE) {
                    tick.tick().await;
                    up.send(piece).await.unwrap();
                }
                let (result, _) = up.finish().await;
                result.unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let sent = start.elapsed();
    wait_finalized(&node, bodies.len() as u64).await;
    let node_cpu = cpu_seconds(&node_pid) - cpu_before;
    let thorough = metric(&node, "castvault_chunks_compressed_thorough_total").await;
    let (stored, chunks) = dir_size(&data.path().join("store"), &|n| n.starts_with("chunk-"));
    println!(
        "size: 100 streams, {:.1} MiB at {:.1} MiB/s in all (sent in {:.1} s), node CPU {:.2} s ({:.0}% of one core): stored {stored} B in {chunks} chunks ({thorough} thorough) = {:.3}x gzip -6 ({gzip_size} B)",
        corpus_bytes.len() as f64 / 1048576.0,
        corpus_bytes.len() as f64 / 1048576.0 / sent.as_secs_f64(),
        sent.as_secs_f64(),
        node_cpu,
        node_cpu / sent.as_secs_f64() * 100.0,
        stored as f64 / gzip_size as f64,
    );
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Per-write ack latency from a stream's send log and ack log.
fn latencies(sends: &[(Instant, u64)], acks: &[(Instant, u64)]) -> Vec<Duration> {
    let mut out = Vec::with_capacity(sends.len());
    let mut a = 0;
    for &(sent_at, offset) in sends {
        while a < acks.len() && (acks[a].1 < offset || acks[a].0 < sent_at) {
            a += 1;
        }
        match acks.get(a) {
            Some(&(acked_at, _)) => out.push(acked_at - sent_at),
            None => out.push(Duration::MAX),
        }
    }
    out
}

/// Runs `streams` concurrent v2 uploads, each sending `event_bytes` every `every` for `duration`.
/// Returns every write's send time and ack latency.
async fn paced_streams(
    node: &Node,
    streams: usize,
    every: Duration,
    event_bytes: usize,
    duration: Duration,
) -> Vec<(Instant, Duration)> {
    let header = format!("{}\n", corpus::header(80, 24));
    let tasks: Vec<_> = (0..streams)
        .map(|i| {
            let addr = node.ingest;
            let header = header.clone();
            tokio::spawn(async move {
                // Spread starts so the streams do not write in lockstep.
                tokio::time::sleep(every.mul_f64((i as f64 / streams as f64).fract())).await;
                let mut up = loop {
                    match start_v2(addr).await {
                        Ok(up) => break up,
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                };
                let mut sends = Vec::new();
                up.send(header.as_bytes()).await.unwrap();
                sends.push((Instant::now(), up.sent));
                let end = Instant::now() + duration;
                let mut t = 0.0;
                let pad = "x".repeat(event_bytes.saturating_sub(24));
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                while Instant::now() < end {
                    tick.tick().await;
                    t += every.as_secs_f64();
                    let line = format!("[{t:.3},\"o\",\"{pad}\"]\n");
                    up.send(line.as_bytes()).await.unwrap();
                    sends.push((Instant::now(), up.sent));
                }
                let log = up.log.clone();
                let (result, _) = up.finish().await;
                result.unwrap();
                let acks = log.lock().unwrap().acks.clone();
                let lat = latencies(&sends, &acks);
                sends.iter().map(|s| s.0).zip(lat).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// A node histogram's cumulative buckets from `/metrics`: (upper bound, count).
async fn node_buckets(web: std::net::SocketAddr, name: &str) -> Vec<(String, u64)> {
    let (_, body) = common::http_get(web, "/metrics").await.unwrap();
    let text = String::from_utf8(body).unwrap();
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|l| l.split_once("\"} "))
        .map(|(le, n)| (le.to_owned(), n.trim().parse().unwrap()))
        .collect()
}

/// The observations between two snapshots of a node histogram as bucket bounds at p50, p90,
/// p99 and the largest bucket used, to tell node time from client and network time.
fn bucket_percentiles(what: &str, before: &[(String, u64)], after: &[(String, u64)]) -> String {
    let buckets: Vec<(String, u64)> = after
        .iter()
        .map(|(le, n)| {
            let earlier = before.iter().find(|b| &b.0 == le).map_or(0, |b| b.1);
            (le.clone(), n - earlier)
        })
        .collect();
    let total = buckets.last().map_or(0, |b| b.1);
    let at = |p: f64| {
        buckets
            .iter()
            .find(|b| b.1 as f64 >= p * total as f64)
            .map_or("?".to_owned(), |b| b.0.clone())
    };
    format!(
        "  node-side {what} ({total}): p50 <= {}s, p90 <= {}s, p99 <= {}s, max <= {}s",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn streams_10k() {
    let data = tempfile::tempdir().unwrap();
    let node = Node::start(data.path(), &[], &[]).await;
    let pid = node.pid();
    let idle_rss = rss_kib(pid, "VmRSS:");
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            peak = peak.max(rss_kib(pid, "VmRSS:"));
            tokio::time::sleep(Duration::from_millis(200)).await;
            if rss_kib(pid, "VmRSS:") == 0 {
                return peak;
            }
        }
    });
    let start = Instant::now();
    let mut lat: Vec<Duration> = paced_streams(
        &node,
        10_000,
        Duration::from_secs(3),
        120,
        Duration::from_secs(30),
    )
    .await
    .into_iter()
    .map(|(_, lat)| lat)
    .collect();
    let elapsed = start.elapsed();
    let hwm = rss_kib(pid, "VmHWM:");
    lat.sort();
    let writes = lat.len();
    println!(
        "10,000 streams x 1 write / 3 s for 30 s ({:.0} s, {writes} writes): node RSS idle {} MiB, peak (VmHWM) {} MiB; ack wait p50 {:?} p99 {:?} max {:?}",
        elapsed.as_secs_f64(),
        idle_rss / 1024,
        hwm / 1024,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().unwrap()
    );
    drop(node);
    sampler.abort();
}

/// Writes sent in the first seconds of a latency run, while the streams are still being opened,
/// are reported apart from the steady state.
const LATENCY_WARMUP: Duration = Duration::from_secs(5);

/// The steady-state window: from the warm-up's end until this long before the streams close.
const LATENCY_STEADY: Duration = Duration::from_secs(20);

async fn latency(streams: usize) {
    let data = tempfile::tempdir().unwrap();
    let mut args = vec!["--ack".to_owned(), "spool".to_owned()];
    if let Ok(config) = std::env::var("CASTVAULT_BENCH_CONFIG") {
        args.extend(["--config".to_owned(), config]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let node = Node::start(data.path(), &args, &[]).await;
    let started = Instant::now();
    let names = [
        ("castvault_ack_latency_seconds", "ack latency, frames"),
        (
            "castvault_spool_journal_commit_seconds",
            "journal commit rounds",
        ),
    ];
    // Snapshots of the node's histograms at the steady window's start and end.
    let snapshots = {
        let node_web = node.web;
        tokio::spawn(async move {
            let mut out = Vec::new();
            for at in [LATENCY_WARMUP, LATENCY_WARMUP + LATENCY_STEADY] {
                tokio::time::sleep_until((started + at).into()).await;
                let mut snap = Vec::new();
                for (name, _) in names {
                    snap.push(node_buckets(node_web, name).await);
                }
                out.push(snap);
            }
            out
        })
    };
    // 8 KiB/s per stream: a 1 KiB write every 125 ms.
    let sent = paced_streams(
        &node,
        streams,
        Duration::from_millis(125),
        1024,
        LATENCY_WARMUP + LATENCY_STEADY + Duration::from_secs(1),
    )
    .await;
    let snapshots = snapshots.await.unwrap();
    // The node's histograms once every stream has closed, for the last second apart.
    let mut closed = Vec::new();
    for (name, _) in names {
        closed.push(node_buckets(node.web, name).await);
    }
    let window = started + LATENCY_WARMUP..started + LATENCY_WARMUP + LATENCY_STEADY;
    let (mut steady, rest): (Vec<_>, Vec<_>) =
        sent.into_iter().partition(|(at, _)| window.contains(at));
    let (mut start, mut end): (Vec<_>, Vec<_>) =
        rest.into_iter().partition(|(at, _)| *at < window.start);
    println!(
        "{streams} streams x 8 KiB/s at ack=spool, {} s warm-up, {} s steady:",
        LATENCY_WARMUP.as_secs(),
        LATENCY_STEADY.as_secs()
    );
    for (i, (_, what)) in names.iter().enumerate() {
        println!(
            "{}",
            bucket_percentiles(what, &snapshots[0][i], &snapshots[1][i])
        );
    }
    for (i, (_, what)) in names.iter().enumerate() {
        println!(
            "{}",
            bucket_percentiles(
                &format!("{what}, last second and close"),
                &snapshots[1][i],
                &closed[i]
            )
        );
    }
    for (what, lat) in [
        ("steady state", &mut steady),
        ("warm-up, streams opening", &mut start),
        ("last second, streams closing", &mut end),
    ] {
        let mut lat: Vec<Duration> = lat.iter().map(|(_, l)| *l).collect();
        if lat.is_empty() {
            continue;
        }
        lat.sort();
        println!(
            "  client-side, {what} ({} writes): ack latency p50 {:?} p90 {:?} p99 {:?} max {:?}",
            lat.len(),
            percentile(&lat, 0.5),
            percentile(&lat, 0.9),
            percentile(&lat, 0.99),
            lat.last().unwrap()
        );
    }
}
