//! castvault's recording format on object storage. Everything that reads or writes a recording's
//! objects goes through this crate; the service, `castvault export` and `castvault verify` share it.
//!
//! - [`keys`]: recording and event ids, and the one place that names every object key.
//! - [`cast`]: tolerant parsing of asciicast v2 header and event lines as Tailscale clients send them.
//! - [`chunk`]: the chunk codec (one zstd frame of whole lines), where chunks are cut, line statistics.
//! - [`manifest`]: the manifest, its hash chain, and the catalog row written beside it.
//! - [`store`]: opening a store from a URL (`file://`, `az://`, `memory://`) and classifying its errors.
//! - [`signing`]: node keys, signed chain checkpoints and the manifest seal.
//! - [`auditlog`]: the audit log's signed hash chain.
//! - [`bundle`]: compliance bundles (tar): headers, reading and verifying them.
//! - [`verify`]: checking a recording's chunks, chain, seal, checkpoints and objects.
//! - [`routing`]: region routing rules over asciicast header fields.
//! - [`reader`]: reading a recording back, verifying every chunk against its manifest.

pub mod auditlog;
pub mod bundle;
pub mod cast;
pub mod chunk;
pub mod keys;
pub mod manifest;
pub mod reader;
pub mod routing;
pub mod signing;
pub mod store;
pub mod verify;
