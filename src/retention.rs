//! Retention policies and legal holds.
//!
//! - A retention rule (`[[retention]]` in the config) keeps the recordings it matches for
//!   `keep_days` after they end. Its conditions (region, srcNodeTags, srcNode, srcNodeUser,
//!   sshUser; `*` globs, any listed value may match, every given condition must hold) are those
//!   of routing rules. Where rules overlap, the longest `keep_days` wins; a recording that no
//!   rule matches is never deleted. Live recordings are never deleted.
//! - A legal hold (`v1/holds/{hold_id}.json`, written to every region's store) names recordings
//!   by id and/or by a query (time range, users, nodes, tags). A held recording is never
//!   deleted, whatever its rules say, until every hold on it is released.
//! - `castvault retention run --dry-run` lists what a run would delete, and a run deletes
//!   exactly that list (given the same time and holds). Each deletion and each hold and release
//!   is written to the audit log.
//!
//! Deletion removes a recording's chunks first and its manifest, seal and catalog row last, so
//! an interrupted run leaves the recording listed and the next run finishes it.

use std::collections::BTreeMap;

use bytes::Bytes;
use castvault_storage::keys::{ObjectKey, RecordingId};
use castvault_storage::manifest::{CatalogRow, RecordingStatus};
use castvault_storage::routing::glob;
use castvault_storage::store::{ErrorKind, Stores, error_kind, put_create};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::audit::Record;

/// One retention rule.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    /// Days after a recording ends (or starts, if it never ended) before it may be deleted.
    pub keep_days: u32,
    #[serde(default)]
    pub region: Vec<String>,
    #[serde(default)]
    pub src_node_tags: Vec<String>,
    #[serde(default)]
    pub src_node: Vec<String>,
    #[serde(default)]
    pub src_node_user: Vec<String>,
    #[serde(default)]
    pub ssh_user: Vec<String>,
}

fn any(patterns: &[String], value: Option<&str>) -> bool {
    patterns.is_empty() || value.is_some_and(|v| patterns.iter().any(|p| glob(p, v)))
}

fn tags(patterns: &[String], tags: &[String]) -> bool {
    patterns.is_empty() || tags.iter().any(|t| patterns.iter().any(|p| glob(p, t)))
}

impl RetentionRule {
    pub fn matches(&self, row: &CatalogRow) -> bool {
        any(&self.region, Some(&row.region))
            && tags(&self.src_node_tags, &row.src_node_tags)
            && any(&self.src_node, row.src_node.as_deref())
            && any(&self.src_node_user, row.src_node_user.as_deref())
            && any(&self.ssh_user, row.ssh_user.as_deref())
    }
}

/// What a legal hold covers.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HoldQuery {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub from: Option<OffsetDateTime>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub to: Option<OffsetDateTime>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_user: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub src_node_user: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub src_node: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub src_node_tags: Vec<String>,
}

/// A legal hold.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Hold {
    pub hold_id: String,
    pub reason: String,
    pub created_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Recordings held by id.
    #[serde(default)]
    pub recording_ids: Vec<String>,
    /// Recordings held by query; `None` holds none by query.
    #[serde(default)]
    pub query: Option<HoldQuery>,
}

impl Hold {
    pub fn holds(&self, row: &CatalogRow) -> bool {
        if self.recording_ids.contains(&row.id) {
            return true;
        }
        self.query.as_ref().is_some_and(|q| q.matches(row))
    }
}

impl HoldQuery {
    /// Every given condition holds for `row`.
    pub fn matches(&self, row: &CatalogRow) -> bool {
        self.from.is_none_or(|from| row.started_at >= from)
            && self.to.is_none_or(|to| row.started_at < to)
            && any(&self.ssh_user, row.ssh_user.as_deref())
            && any(&self.src_node_user, row.src_node_user.as_deref())
            && any(&self.src_node, row.src_node.as_deref())
            && tags(&self.src_node_tags, &row.src_node_tags)
    }
}

/// Why a retention or hold command failed.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error("store: {0}")]
    Store(String),
    #[error("invalid hold id {0:?}: 1 to 64 of a-z, 0-9, '-' and '_'")]
    HoldId(String),
    #[error("no hold {0}")]
    NoHold(String),
}

fn store_err(e: impl std::fmt::Display) -> RetentionError {
    RetentionError::Store(e.to_string())
}

fn hold_path(hold_id: &str) -> object_store::path::Path {
    object_store::path::Path::from(format!("v1/holds/{hold_id}.json"))
}

fn valid_hold_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Every hold, from every region's store (a hold is written to all of them).
pub async fn holds(stores: &Stores) -> Result<Vec<Hold>, RetentionError> {
    let mut found: BTreeMap<String, Hold> = BTreeMap::new();
    for (_, region) in stores.iter() {
        let metas: Vec<_> = region
            .store
            .list(Some(&object_store::path::Path::from("v1/holds")))
            .try_collect()
            .await
            .map_err(store_err)?;
        for meta in metas {
            let bytes = region
                .store
                .get(&meta.location)
                .await
                .map_err(store_err)?
                .bytes()
                .await
                .map_err(store_err)?;
            let hold: Hold = serde_json::from_slice(&bytes)
                .map_err(|e| RetentionError::Store(format!("{}: {e}", meta.location)))?;
            found.insert(hold.hold_id.clone(), hold);
        }
    }
    Ok(found.into_values().collect())
}

/// Who runs an offline command: their name, and the key their audit records are signed with.
pub struct Actor {
    pub name: String,
    pub key: castvault_storage::signing::NodeKey,
}

async fn audit(
    stores: &Stores,
    region: &str,
    actor: &Actor,
    action: &str,
    id: Option<&str>,
    query: String,
) -> Result<(), RetentionError> {
    let record = Record {
        time: OffsetDateTime::now_utc(),
        node: "cli".to_owned(),
        actor: actor.name.clone(),
        via: "cli".to_owned(),
        action: action.to_owned(),
        recording_id: id.map(str::to_owned),
        query: Some(query),
        remote: "local".to_owned(),
    };
    let store = stores
        .region(region)
        .map_or_else(|| stores.home_store(), |r| &r.store);
    crate::audit::write_one(store, &actor.key, &record)
        .await
        .map_err(store_err)
}

/// Places a hold in every region's store (audited).
pub async fn add_hold(stores: &Stores, hold: &Hold, actor: &Actor) -> Result<(), RetentionError> {
    if !valid_hold_id(&hold.hold_id) {
        return Err(RetentionError::HoldId(hold.hold_id.clone()));
    }
    let bytes = Bytes::from(serde_json::to_vec_pretty(hold).unwrap_or_default());
    for (region, entry) in stores.iter() {
        match put_create(
            entry.store.as_ref(),
            &hold_path(&hold.hold_id),
            bytes.clone(),
        )
        .await
        {
            Ok(()) => {}
            Err(e) if error_kind(&e) == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(RetentionError::Store(format!("region {region}: {e}"))),
        }
    }
    let query = serde_json::to_string(hold).unwrap_or_default();
    audit(stores, stores.home().as_str(), actor, "hold", None, query).await
}

/// Releases a hold everywhere (audited).
pub async fn release_hold(
    stores: &Stores,
    hold_id: &str,
    actor: &Actor,
) -> Result<(), RetentionError> {
    if !valid_hold_id(hold_id) {
        return Err(RetentionError::HoldId(hold_id.to_owned()));
    }
    if !holds(stores).await?.iter().any(|h| h.hold_id == hold_id) {
        return Err(RetentionError::NoHold(hold_id.to_owned()));
    }
    audit(
        stores,
        stores.home().as_str(),
        actor,
        "release-hold",
        None,
        format!("hold_id={hold_id}"),
    )
    .await?;
    for (_, entry) in stores.iter() {
        match entry.store.delete(&hold_path(hold_id)).await {
            Ok(()) => {}
            Err(e) if error_kind(&e) == ErrorKind::NotFound => {}
            Err(e) => return Err(store_err(e)),
        }
    }
    Ok(())
}

/// A recording a run would delete, and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Expired {
    pub recording_id: String,
    pub keep_days: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub expired_at: OffsetDateTime,
}

/// What retention would delete at `now`: every finalized recording whose longest matching
/// rule's `keep_days` has passed since it ended, and that no hold holds.
pub async fn plan(
    stores: &Stores,
    rules: &[RetentionRule],
    now: OffsetDateTime,
) -> Result<Vec<Expired>, RetentionError> {
    let holds = holds(stores).await?;
    let mut out = Vec::new();
    for (_, region) in stores.iter() {
        let rows = castvault_storage::reader::list_catalog(region.store.as_ref())
            .await
            .map_err(store_err)?;
        for row in rows {
            if row.status == RecordingStatus::Live || holds.iter().any(|h| h.holds(&row)) {
                continue;
            }
            let Some(keep_days) = rules
                .iter()
                .filter(|r| r.matches(&row))
                .map(|r| r.keep_days)
                .max()
            else {
                continue;
            };
            let ended = row.ended_at.unwrap_or(row.started_at);
            let expired_at = ended + time::Duration::days(i64::from(keep_days));
            if expired_at <= now {
                out.push(Expired {
                    recording_id: row.id.clone(),
                    keep_days,
                    expired_at,
                });
            }
        }
    }
    out.sort_by(|a, b| a.recording_id.cmp(&b.recording_id));
    Ok(out)
}

/// Deletes one recording: its chunks and derived objects, then its manifest, seal and catalog
/// row (audited first).
pub async fn delete(
    stores: &Stores,
    expired: &Expired,
    actor: &Actor,
) -> Result<(), RetentionError> {
    let id = RecordingId::parse(&expired.recording_id).map_err(store_err)?;
    let store = stores.for_id(&id).map_err(store_err)?;
    audit(
        stores,
        id.region(),
        actor,
        "delete",
        Some(id.as_str()),
        format!(
            "retention: keep_days={} expired_at={}",
            expired.keep_days, expired.expired_at
        ),
    )
    .await?;
    let prefix = ObjectKey::recording_prefix(&id);
    let mut paths: Vec<object_store::path::Path> = store
        .list(Some(&prefix))
        .map_ok(|m| m.location)
        .try_collect()
        .await
        .map_err(store_err)?;
    let last = |p: &object_store::path::Path| {
        matches!(p.filename(), Some("manifest.json" | "manifest.sig.json"))
    };
    paths.sort_by_key(last);
    paths.push(ObjectKey::catalog(&id));
    delete_all(store.as_ref(), paths).await?;
    // An indexer that was indexing it may have put its outputs after the listing: they are
    // listed now (one put after this finds the manifest gone and deletes its own).
    let late: Vec<object_store::path::Path> = store
        .list(Some(&prefix))
        .map_ok(|m| m.location)
        .try_collect()
        .await
        .map_err(store_err)?;
    delete_all(store.as_ref(), late).await
}

async fn delete_all(
    store: &dyn object_store::ObjectStore,
    paths: Vec<object_store::path::Path>,
) -> Result<(), RetentionError> {
    for path in paths {
        match store.delete(&path).await {
            Ok(()) => {}
            Err(e) if error_kind(&e) == ErrorKind::NotFound => {}
            Err(e) => return Err(store_err(e)),
        }
    }
    Ok(())
}
