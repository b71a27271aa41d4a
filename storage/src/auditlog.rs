//! The audit log's own integrity: every audit object begins with a signed link line.
//!
//! A node's audit writer is a *run* (one process lifetime, named by its start time). Each object
//! it writes, `v1/audit/{day}/{node}-{seq}.jsonl`, starts with a link: the run, the object's
//! index in the run (0, 1, 2, ...), the SHA-256 of the previous object's exact bytes (for
//! index 0, of `"castvault-audit-v1\0{node}\0{run}"`), the SHA-256 of the record lines that
//! follow, and the node's Ed25519 signature over all of it. `castvault verify --audit` walks
//! every run of the days asked for: a changed, removed, reordered or inserted object or record
//! breaks its run's chain or its signature. (The last objects of a run can be removed without a
//! trace in the chain itself; pair the log with storage immutability where that matters.)

use std::collections::BTreeMap;

use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::keys::ObjectKey;
use crate::signing::{self, NodeKey};
use crate::verify::{KeyRing, Report};

pub const LINK_FORMAT: &str = "castvault-audit-link/1";

/// The first line of an audit object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub format: String,
    pub node: String,
    pub run: u64,
    pub index: u64,
    pub prev: String,
    pub records_sha256: String,
    pub key_id: String,
    pub signature: String,
}

impl Link {
    fn message(&self) -> Vec<u8> {
        format!(
            "castvault-audit-link-v1\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n",
            self.format,
            self.node,
            self.run,
            self.index,
            self.prev,
            self.records_sha256,
            self.key_id
        )
        .into_bytes()
    }

    fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The `prev` of a run's first object.
pub fn genesis(node: &str, run: u64) -> [u8; 32] {
    Sha256::digest(format!("castvault-audit-v1\0{node}\0{run}")).into()
}

/// Builds an audit object: the signed link line, then the record lines. Returns the object and
/// its SHA-256 (the next object's `prev`).
pub fn object(
    key: &NodeKey,
    node: &str,
    run: u64,
    index: u64,
    prev: &[u8; 32],
    records: &[u8],
) -> (Vec<u8>, [u8; 32]) {
    let mut link = Link {
        format: LINK_FORMAT.to_owned(),
        node: node.to_owned(),
        run,
        index,
        prev: hex::encode(prev),
        records_sha256: hex::encode(Sha256::digest(records)),
        key_id: key.key_id().to_owned(),
        signature: String::new(),
    };
    link.signature = key.sign_raw(&link.message());
    let mut bytes = link.to_bytes();
    bytes.push(b'\n');
    bytes.extend_from_slice(records);
    let digest = Sha256::digest(&bytes).into();
    (bytes, digest)
}

/// One stored audit object of a run: its index, key and bytes.
type RunObject = (u64, String, Vec<u8>);

/// Verifies the audit objects of the given days (UTC) in one store.
pub async fn verify_days(store: &dyn ObjectStore, days: &[OffsetDateTime]) -> Report {
    let mut report = Report::default();
    if let Err(failure) = verify_inner(store, days, &mut report).await {
        report.failure = Some(failure);
    }
    report
}

async fn verify_inner(
    store: &dyn ObjectStore,
    days: &[OffsetDateTime],
    report: &mut Report,
) -> Result<(), String> {
    // Every object, grouped by (node, run) and ordered by index.
    let mut runs: BTreeMap<(String, u64), Vec<RunObject>> = BTreeMap::new();
    let mut keys = KeyRing::default();
    let mut objects = 0usize;
    let mut records = 0usize;
    for day in days {
        let metas: Vec<_> = store
            .list(Some(&ObjectKey::audit_day(*day)))
            .try_collect()
            .await
            .map_err(|e| format!("cannot list the audit log: {e}"))?;
        for meta in metas {
            let name = meta.location.to_string();
            let bytes = store
                .get(&meta.location)
                .await
                .map_err(|e| format!("{name}: {e}"))?
                .bytes()
                .await
                .map_err(|e| format!("{name}: {e}"))?;
            let newline = bytes
                .iter()
                .position(|&b| b == b'\n')
                .ok_or_else(|| format!("{name}: no link line"))?;
            let link: Link = serde_json::from_slice(&bytes[..newline])
                .map_err(|e| format!("{name}: the link line is not valid: {e}"))?;
            if link.to_bytes() != bytes[..newline] || link.format != LINK_FORMAT {
                return Err(format!("{name}: the link line is not in its stored form"));
            }
            let body = &bytes[newline + 1..];
            if hex::encode(Sha256::digest(body)) != link.records_sha256 {
                return Err(format!(
                    "{name}: its records differ from its link (a record was changed)"
                ));
            }
            if !keys.contains(&link.key_id) {
                let path = ObjectKey::public_key(&link.key_id);
                if let Ok(got) = store.get(&path).await
                    && let Ok(key_bytes) = got.bytes().await
                    && let Ok(record) = serde_json::from_slice(&key_bytes)
                {
                    keys.insert(record);
                }
            }
            let key = keys
                .get(&link.key_id)
                .ok_or_else(|| format!("{name}: signed by unknown key {}", link.key_id))?;
            if !signing::verify(key, &link.message(), &link.signature) {
                return Err(format!("{name}: the link's signature does not verify"));
            }
            objects += 1;
            records += body
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .count();
            runs.entry((link.node.clone(), link.run))
                .or_default()
                .push((link.index, name, bytes.to_vec()));
        }
    }
    for ((node, run), mut objs) in runs {
        objs.sort_by_key(|(index, ..)| *index);
        let mut prev = genesis(&node, run);
        let first = objs.first().map_or(0, |o| o.0);
        for (expected, (index, name, bytes)) in (first..).zip(&objs) {
            if *index != expected {
                return Err(format!(
                    "{name}: audit object {expected} of node {node} run {run} is missing"
                ));
            }
            let newline = bytes.iter().position(|&b| b == b'\n').unwrap_or(0);
            let link: Link =
                serde_json::from_slice(&bytes[..newline]).map_err(|e| e.to_string())?;
            // A run that began on an earlier day than those asked for starts mid-chain.
            if !(expected == first && first > 0) && link.prev != hex::encode(prev) {
                return Err(format!(
                    "{name}: does not follow the previous audit object of its run"
                ));
            }
            prev = Sha256::digest(bytes).into();
        }
    }
    report.checked.push(format!(
        "audit log: {objects} objects, {records} records, every chain link and signature verified"
    ));
    Ok(())
}
