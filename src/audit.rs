//! The audit log: who viewed, searched, exported or watched what. Records go to the store as
//! JSON lines, `v1/audit/{yyyy}/{mm}/{dd}/{node}-{seq}.jsonl`, each object written once with a
//! conditional create. Records are batched (group commit): [`Audit::record`] returns once the
//! object holding its record is stored, and a request whose record cannot be stored fails, so
//! nothing is shown without a trace.

use bytes::Bytes;
use castvault_storage::keys::ObjectKey;
use std::sync::Arc;

use castvault_storage::auditlog;
use castvault_storage::signing::NodeKey;
use castvault_storage::store::DynStore;
use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

/// Records waiting for the writer; a full queue makes requests wait (back-pressure), never drops.
const AUDIT_QUEUE: usize = 1024;

/// Records per stored object at most. A batch is whatever queued up while the previous object
/// was being written, so a lone request waits one put, and a busy node writes few objects.
const AUDIT_BATCH: usize = 256;

/// One access.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub node: String,
    /// Who: a token's name, or a login name.
    pub actor: String,
    /// How they were identified: `token`, `proxy`, `whois`.
    pub via: String,
    /// `list`, `search`, `view`, `export`, `live`, `audit`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording_id: Option<String>,
    /// The query of a list or search.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    pub remote: String,
}

type Pending = (Record, oneshot::Sender<Result<(), String>>);

/// Handle to the audit writer; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<Pending>,
}

#[derive(Debug, thiserror::Error)]
#[error("audit log unavailable: {0}")]
pub struct AuditError(String);

impl Audit {
    /// Starts the writer for `node` on the current runtime.
    pub fn start(store: DynStore, node: &str, signer: Arc<NodeKey>) -> Self {
        let (tx, rx) = mpsc::channel(AUDIT_QUEUE);
        tokio::spawn(writer(store, sanitize(node), signer, rx));
        Self { tx }
    }

    /// Stores `record`; returns once it is in the store.
    ///
    /// # Errors
    /// [`AuditError`] when it could not be stored.
    pub async fn record(&self, record: Record) -> Result<(), AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send((record, done))
            .await
            .map_err(|_| AuditError("writer stopped".into()))?;
        wait.await
            .map_err(|_| AuditError("writer stopped".into()))?
            .map_err(AuditError)
    }
}

/// Node names in keys: letters, digits, `.`, `_`, `-`; anything else becomes `_`.
fn sanitize(node: &str) -> String {
    node.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

async fn writer(
    store: DynStore,
    node: String,
    signer: Arc<NodeKey>,
    mut rx: mpsc::Receiver<Pending>,
) {
    // Sequence numbers start at the start-up time in microseconds, so a restarted node never
    // reuses a key, and keys sort in write order. That start is also the run's name in the
    // chain (see `castvault_storage::auditlog`).
    let mut seq =
        u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000).unwrap_or(0);
    let run = seq;
    let mut index = 0u64;
    let mut prev = auditlog::genesis(&node, run);
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < AUDIT_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let mut body = Vec::new();
        for (record, _) in &batch {
            if serde_json::to_writer(&mut body, record).is_ok() {
                body.push(b'\n');
            }
        }
        seq += 1;
        let path = ObjectKey::audit(OffsetDateTime::now_utc(), &node, seq);
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let (object, digest) = auditlog::object(&signer, &node, run, index, &prev, &body);
        let result = store
            .put_opts(&path, PutPayload::from(Bytes::from(object)), options)
            .await
            .map(|_| ())
            .map_err(|e| crate::upload::error_chain(&e));
        // A failed object is not part of the chain: the next one links to the last stored.
        if result.is_ok() {
            index += 1;
            prev = digest;
        }
        if let Err(e) = &result {
            tracing::error!(path = %path, error = %e, "audit records could not be stored; their requests fail");
        }
        for (_, done) in batch {
            let _ = done.send(result.clone());
        }
    }
}

/// Stores one record on its own (offline commands, which have no writer task). Its key is
/// unique by the time in nanoseconds.
///
/// # Errors
/// Store errors.
pub async fn write_one(
    store: &DynStore,
    signer: &NodeKey,
    record: &Record,
) -> Result<(), object_store::Error> {
    let seq = u64::try_from(record.time.unix_timestamp_nanos()).unwrap_or(0);
    let node = sanitize(&record.node);
    let path = ObjectKey::audit(record.time, &node, seq);
    let mut line = serde_json::to_vec(record).unwrap_or_default();
    line.push(b'\n');
    let genesis = auditlog::genesis(&node, seq);
    let (object, _) = auditlog::object(signer, &node, seq, 0, &genesis, &line);
    store
        .put_opts(
            &path,
            PutPayload::from(object),
            PutOptions::from(PutMode::Create),
        )
        .await
        .map(|_| ())
}

/// Reads the audit records of one day (UTC), from every node, in key order.
///
/// # Errors
/// Store errors.
pub async fn read_day(
    store: &DynStore,
    day: OffsetDateTime,
) -> Result<Vec<Record>, object_store::Error> {
    let mut metas: Vec<_> = store
        .list(Some(&ObjectKey::audit_day(day)))
        .try_collect()
        .await?;
    metas.sort_by(|a, b| a.location.cmp(&b.location));
    let mut records = Vec::new();
    for meta in metas {
        let bytes = store.get(&meta.location).await?.bytes().await?;
        records.extend(
            bytes
                .split(|&b| b == b'\n')
                .filter_map(|l| serde_json::from_slice::<Record>(l).ok()),
        );
    }
    Ok(records)
}
