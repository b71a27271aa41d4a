//! Import throughput from a local tsrecorder directory, against `zstd -3 -T1` on the same files
//! in the same run (target: at least 0.5×).
//!
//! `cargo bench --bench import`. Generates a tsrecorder directory (`<stableNodeID>/<time>.cast`,
//! 300 recordings of generated terminal output, 256 MiB unless `CASTVAULT_BENCH_MIB` says
//! otherwise), then per round: `zstd -q -3 -T1 -c` over every file to /dev/null, and
//! `castvault import` (release build, local-disk store with fsync, fresh store each round) with
//! its default jobs (one per CPU) and with `--jobs 1`. Reported per round: MiB/s of each, the
//! ratios, the import's CPU seconds and peak RSS; then the median ratio of three rounds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

const RECORDINGS: usize = 300;
const ROUNDS: usize = 3;

fn corpus_bytes() -> usize {
    std::env::var("CASTVAULT_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(256)
        << 20
}

fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("tsrecorder");
    let files = generate(&src, corpus_bytes());
    let total: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
    let mib = total as f64 / 1048576.0;
    println!(
        "corpus: {} recordings, {mib:.1} MiB, {} CPUs",
        files.len(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut ratios = Vec::new();
    let mut ratios_one = Vec::new();
    for round in 1..=ROUNDS {
        let zstd = time_zstd(&files);
        let (import, cpu, rss) = time_import(dir.path(), &src, round, None);
        let (import_one, cpu_one, rss_one) = time_import(dir.path(), &src, round, Some(1));
        if let Ok(extra) = std::env::var("CASTVAULT_BENCH_JOBS") {
            for jobs in extra.split(',').filter_map(|j| j.parse().ok()) {
                let (t, cpu, rss) = time_import(dir.path(), &src, round, Some(jobs));
                println!(
                    "round {round}: import --jobs {jobs} {:.1} MiB/s = {:.2}x ({cpu:.1} CPU s, {rss:.0} MiB RSS)",
                    mib / t.as_secs_f64(),
                    zstd.as_secs_f64() / t.as_secs_f64()
                );
            }
        }
        let rate = |d: Duration| mib / d.as_secs_f64();
        ratios.push(rate(import) / rate(zstd));
        ratios_one.push(rate(import_one) / rate(zstd));
        println!(
            "round {round}: zstd -3 -T1 {:.1} MiB/s; import {:.1} MiB/s = {:.2}x ({cpu:.1} CPU s, {rss:.0} MiB RSS); import --jobs 1 {:.1} MiB/s = {:.2}x ({cpu_one:.1} CPU s, {rss_one:.0} MiB RSS)",
            rate(zstd),
            rate(import),
            rate(import) / rate(zstd),
            rate(import_one),
            rate(import_one) / rate(zstd),
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "median of {ROUNDS}: import {:.2}x zstd -3 -T1; import --jobs 1 {:.2}x (target >= 0.5x)",
        median(&mut ratios),
        median(&mut ratios_one)
    );
}

/// A tsrecorder directory: three nodes, RFC 3339 names, sizes from 1/4 to 7/4 of the mean,
/// every file an hour old (so none counts as still being written).
fn generate(src: &Path, bytes: usize) -> Vec<PathBuf> {
    let mean = bytes / RECORDINGS;
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    (0..RECORDINGS)
        .map(|i| {
            let node = ["nBENCH1CNTRL", "nBENCH2CNTRL", "nBENCH3CNTRL"][i % 3];
            let size = mean / 4 + (i * 7919) % (mean * 3 / 2);
            let t = time::OffsetDateTime::from_unix_timestamp(1_785_000_000 + i as i64 * 61)
                .unwrap()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            let path = src.join(node).join(format!("{t}.cast"));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, common::corpus::generate(i as u64, size)).unwrap();
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(an_hour_ago)
                .unwrap();
            path
        })
        .collect()
}

fn time_zstd(files: &[PathBuf]) -> Duration {
    let started = Instant::now();
    let out = Command::new("zstd")
        .args(["-q", "-3", "-T1", "-c"])
        .args(files)
        .stdout(std::process::Stdio::null())
        .output()
        .expect("zstd is installed");
    assert!(out.status.success());
    started.elapsed()
}

/// Runs one import into a fresh store; wall time, CPU seconds (user + system) and peak RSS.
fn time_import(dir: &Path, src: &Path, round: usize, jobs: Option<usize>) -> (Duration, f64, f64) {
    let name = format!(
        "round-{round}-{}",
        jobs.map_or("auto".to_owned(), |j| j.to_string())
    );
    let store = dir.join(&name);
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{}\"\nstore = \"file://{}\"\n",
            dir.join("data").display(),
            store.display()
        ),
    )
    .unwrap();
    let report = dir.join(format!("{name}.time"));
    let mut cmd = Command::new("/usr/bin/time");
    cmd.args(["-f", "%U %S %M", "-o"])
        .arg(&report)
        .arg(common::BIN)
        .args(["import", "--json", "--progress", "never", "--config"])
        .arg(&cfg)
        .arg(src)
        .env("RUST_LOG", "warn");
    if let Some(jobs) = jobs {
        cmd.args(["--jobs", &jobs.to_string()]);
    }
    let started = Instant::now();
    let out = cmd.output().unwrap();
    let wall = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8(out.stdout).unwrap();
    let summary: serde_json::Value = serde_json::from_str(summary.lines().last().unwrap()).unwrap();
    assert_eq!(
        summary["totals"]["recordings_imported"], RECORDINGS,
        "{summary}"
    );
    let fields: Vec<f64> = std::fs::read_to_string(&report)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    // Kept: deleting thousands of files just before the next round's import makes ext4's inode
    // allocator search recently freed inodes on every create, which no real import meets.
    (wall, fields[0] + fields[1], fields[2] / 1024.0)
}
