//! Export and verify of a 1 GB recording: resident memory and verify speed, on the release
//! binary with the local store.
//!
//! `cargo bench --bench compliance`. A node records a 1 GiB generated terminal session; then,
//! each as its own process, `castvault verify ID`, `castvault export ID --format bundle` and
//! `castvault verify --bundle`. Reported: wall time, CPU time, raw MB/s per CPU-second, and peak
//! resident memory (`/usr/bin/time`'s maximum RSS of each command). Targets: ≤ 64 MiB resident for export and verify,
//! verify ≥ 300 MB/s of raw recording on one core (the verifier is single-threaded, so raw bytes
//! per CPU-second is its one-core speed).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Node, corpus, start_v2};

/// 1 GiB unless `CASTVAULT_BENCH_MIB` says otherwise.
fn recording_bytes() -> usize {
    std::env::var("CASTVAULT_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1024)
        << 20
}

fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

/// Runs a CLI command to completion under `/usr/bin/time`; returns wall seconds, CPU seconds
/// of all children so far, and the command's own peak RSS in MiB.
fn measure(node: &Node, args: &[&str]) -> (f64, f64, f64) {
    let rss_file = tempfile::NamedTempFile::new().unwrap();
    let options = ["-f", "%M", "-o", rss_file.path().to_str().unwrap()];
    let started = Instant::now();
    let out = node.cli_via(Some(("/usr/bin/time", &options)), args);
    let wall = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let kib: f64 = std::fs::read_to_string(rss_file.path())
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (wall, children_cpu(), kib / 1024.0)
}

/// CPU seconds of every waited child so far.
fn children_cpu() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN).unwrap();
    usage.user_time().tv_sec() as f64
        + usage.user_time().tv_usec() as f64 / 1e6
        + usage.system_time().tv_sec() as f64
        + usage.system_time().tv_usec() as f64 / 1e6
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[], &[]).await;
    let body = corpus::generate(31, recording_bytes());
    let mut upload = start_v2(node.ingest).await.unwrap();
    for piece in body.chunks(256 << 10) {
        upload.send(piece).await.unwrap();
    }
    let (result, _) = upload.finish().await;
    result.unwrap();
    let raw = body.len() as f64;
    drop(body);
    let rows = node.wait_finalized(1).await;
    let id = rows[0]["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // RUSAGE_CHILDREN accumulates CPU over every waited child and keeps the largest RSS, so
    // each figure is taken as a difference (CPU) and as the running maximum (RSS, reported
    // only where it grew past the previous children's).
    let _ = std::process::Command::new("true").status();
    let mut cpu_before = children_cpu();
    let mut report = |what: &str, args: &[&str]| {
        let (wall, cpu, rss) = measure(&node, args);
        let used = cpu - cpu_before;
        cpu_before = cpu;
        println!(
            "{what}: {:.2} s wall, {used:.2} CPU-s, {:.0} MB/s of raw recording per CPU-second, peak RSS {rss:.1} MiB (target <= 64)",
            wall,
            raw / 1e6 / used
        );
    };
    report("verify (store)", &["verify", &id]);
    let bundle = dir.path().join("bundle.tar");
    report(
        "export bundle",
        &[
            "export",
            &id,
            "--format",
            "bundle",
            "--output",
            bundle.to_str().unwrap(),
        ],
    );
    report(
        "verify (bundle)",
        &["verify", "--bundle", bundle.to_str().unwrap()],
    );
    println!(
        "recording: {:.0} MB raw; verify target >= 300 MB/s on one core",
        raw / 1e6
    );
    // For profiling the verifier on its own: `CASTVAULT_BENCH_KEEP=DIR` keeps the bundle there.
    if let Some(keep) = std::env::var_os("CASTVAULT_BENCH_KEEP") {
        std::fs::copy(&bundle, std::path::Path::new(&keep).join("bundle.tar")).unwrap();
    }
}
