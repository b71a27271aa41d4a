//! The chunk codec on a realistic 4 MiB chunk: zstd level 1 and 3 (the default) compression,
//! line statistics, SHA-256, and capped decoding.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "corpus/mod.rs"]
#[allow(dead_code)]
mod corpus;

use castvault_storage::chunk::{self, ChunkEncoder, ChunkStats};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn codec(c: &mut Criterion) {
    let raw = corpus::generate(3, 4 << 20);
    let len = chunk::next_chunk_len(&raw, 4 << 20, false).unwrap();
    let raw = &raw[..len];
    let mut group = c.benchmark_group("chunk");
    group.throughput(Throughput::Bytes(raw.len() as u64));
    group.sample_size(20);
    for level in [1, 3] {
        let mut encoder = ChunkEncoder::new(level).unwrap();
        group.bench_function(format!("encode_zstd{level}"), |b| {
            b.iter(|| encoder.encode(raw).unwrap())
        });
    }
    group.bench_function("scan_lines", |b| b.iter(|| ChunkStats::scan(raw, true)));
    group.bench_function("sha256", |b| b.iter(|| chunk::digest(raw)));
    group.bench_function("sha256_ring", |b| {
        b.iter(|| ring::digest::digest(&ring::digest::SHA256, raw))
    });
    let compressed = ChunkEncoder::new(3).unwrap().encode(raw).unwrap();
    group.bench_function("decode", |b| {
        b.iter(|| chunk::decode(&compressed, raw.len()).unwrap())
    });
    let mut decoder = chunk::ChunkDecoder::new().unwrap();
    group.bench_function("decode_reused_context", |b| {
        b.iter(|| decoder.decode(&compressed, raw.len()).unwrap())
    });
    let mut out = Vec::new();
    group.bench_function("decode_reused_buffer", |b| {
        b.iter(|| {
            decoder
                .decode_into(&compressed, raw.len(), &mut out)
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
