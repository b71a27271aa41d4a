//! castvault: a resilient, Tailscale-compatible SSH session recorder.
//!
//! Data path, one module per stage, dependencies pointing downstream:
//! - [`ingest`]: the Tailscale wire protocol (v1 `/record`, v2 `/v2/record` with acks, `/v2/event`), admission.
//! - [`spool`]: append-only local files per recording, group-committed fsync, crash recovery.
//! - [`upload`]: cuts spooled bytes into zstd chunks, commits them, writes manifest and catalog row.
//! - [`playback`]: the web listener: health, readiness, metrics, the recordings API.
//!
//! Around it:
//! - [`admission`]: who may send recordings, and the per-peer and per-stream limits.
//! - [`tls`]: the web listener's certificate, reloaded when its files change.
//! - [`config`]: the typed, strict node configuration and its validation.
//! - [`listener`]: accept loops serving HTTP/1.1 and h2c on one port, with connection caps.
//! - [`metrics`]: Prometheus counters, names in one place.
//! - [`app`]: wiring, start-up recovery and ordered shutdown.
//! - [`cli`]: the offline commands (`recordings list`, `export`, `config check`).
//! - [`import`]: `castvault import` from tsrecorder's directory and S3 layouts.
//! - [`play`]: `castvault play`, a recording in the terminal straight from the store.
//!
//! The on-storage format (keys, chunks, manifest, stores) is the `castvault-storage` crate.

pub mod admission;
pub mod app;
pub mod audit;
pub mod auth;
pub mod background;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod export;
pub mod gateway;
pub mod health;
pub mod import;
pub mod indexer;
pub mod ingest;
pub mod keys;
pub mod lease;
pub mod listener;
pub mod live;
pub mod metrics;
pub mod play;
pub mod playback;
pub mod retention;
pub mod spool;
pub mod tls;
pub mod ui;
pub mod upload;
