//! Opening stores from URLs and classifying their errors.
//!
//! | URL | store |
//! | --- | --- |
//! | `file:///abs/path` | local disk, fsync on every put (the embedded default) |
//! | `az://CONTAINER` | Azure Blob through object_store. Settings come from the environment (`AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_SAS_KEY`, `AZURE_FEDERATED_TOKEN_FILE` for workload identity, managed identity by default, `AZURE_STORAGE_USE_EMULATOR` for Azurite) and from the config's `store_options`, which win. |
//! | `memory://` | in memory, for tests |
//!
//! Immutable objects (chunks, manifests, events) are written with [`put_create`] so an existing
//! object is never overwritten.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{BackoffConfig, ObjectStore, PutMode, PutPayload, RetryConfig};

use crate::keys::{RecordingId, Region};

pub type DynStore = Arc<dyn ObjectStore>;

/// Retries inside one request to the store; the uploader retries on top with its own, visible
/// backoff, so this stays short.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: Duration::from_secs(20),
    }
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("unknown store option {key:?} for {url}")]
    UnknownOption { url: String, key: String },
    #[error("cannot open store {url}")]
    Open {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot create store directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a caller may do about a store error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    /// A conditional request lost (stale ETag).
    Precondition,
    /// Worth retrying: network, throttling, server errors.
    Transient,
    /// Retrying cannot help: auth, bad path, unsupported call.
    Permanent,
}

pub fn error_kind(e: &object_store::Error) -> ErrorKind {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => ErrorKind::NotFound,
        E::AlreadyExists { .. } => ErrorKind::AlreadyExists,
        E::Precondition { .. } | E::NotModified { .. } => ErrorKind::Precondition,
        E::InvalidPath { .. }
        | E::NotSupported { .. }
        | E::NotImplemented { .. }
        | E::PermissionDenied { .. }
        | E::Unauthenticated { .. }
        | E::UnknownConfigurationKey { .. } => ErrorKind::Permanent,
        _ => ErrorKind::Transient,
    }
}

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    File(PathBuf),
    Azure { container: String },
    Memory,
}

impl StoreUrl {
    /// # Errors
    /// [`StoreError::InvalidUrl`] for unknown schemes, relative paths and empty containers.
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        let invalid = |reason: &str| StoreError::InvalidUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
        match parsed.scheme() {
            "file" => {
                let path = parsed
                    .to_file_path()
                    .map_err(|()| invalid("file URLs need an absolute path"))?;
                Ok(Self::File(path))
            }
            "memory" => Ok(Self::Memory),
            "az" | "azure" => {
                let container = parsed.host_str().unwrap_or_default();
                let valid = (3..=63).contains(&container.len())
                    && container
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                if !valid || !parsed.path().trim_matches('/').is_empty() {
                    return Err(invalid(
                        "expected az://CONTAINER (3 to 63 of a-z, 0-9, '-')",
                    ));
                }
                Ok(Self::Azure {
                    container: container.to_owned(),
                })
            }
            other => Err(invalid(&format!(
                "unsupported scheme {other:?} (file, az, memory)"
            ))),
        }
    }
}

/// Opens the store a URL names.
///
/// # Errors
/// [`StoreError`] for a bad URL, an unknown option or a store that cannot be built.
pub fn open(url: &str, options: &BTreeMap<String, String>) -> Result<DynStore, StoreError> {
    match StoreUrl::parse(url)? {
        StoreUrl::File(path) => {
            if let Some(key) = options.keys().next() {
                return Err(StoreError::UnknownOption {
                    url: url.to_owned(),
                    key: key.clone(),
                });
            }
            std::fs::create_dir_all(&path).map_err(|source| StoreError::CreateDir {
                path: path.clone(),
                source,
            })?;
            let store = LocalFileSystem::new_with_prefix(&path)
                .map_err(|source| StoreError::Open {
                    url: url.to_owned(),
                    source,
                })?
                .with_fsync(true)
                .with_automatic_cleanup(true);
            Ok(Arc::new(store))
        }
        StoreUrl::Memory => Ok(Arc::new(InMemory::new())),
        StoreUrl::Azure { container } => {
            install_crypto_provider();
            let mut builder = MicrosoftAzureBuilder::from_env()
                .with_container_name(container)
                .with_retry(retry_config());
            for (key, value) in options {
                let key = AzureConfigKey::from_str(key).map_err(|_| StoreError::UnknownOption {
                    url: url.to_owned(),
                    key: key.clone(),
                })?;
                builder = builder.with_config(key, value);
            }
            let store = builder.build().map_err(|source| StoreError::Open {
                url: url.to_owned(),
                source,
            })?;
            Ok(Arc::new(store))
        }
    }
}

/// One region's store.
#[derive(Clone)]
pub struct RegionStore {
    pub store: DynStore,
    /// The URL it was opened from (no secrets: options are kept apart).
    pub url: String,
    /// Conditional updates on ETags work (Azure, memory); the local disk has none, so leases
    /// there are single-node (see `castvault::lease`).
    pub conditional_updates: bool,
}

impl RegionStore {
    /// Opens the store `url` names.
    ///
    /// # Errors
    /// As [`open`].
    pub fn open(url: &str, options: &BTreeMap<String, String>) -> Result<Self, StoreError> {
        let conditional_updates = !matches!(StoreUrl::parse(url)?, StoreUrl::File(_));
        Ok(Self {
            store: open(url, options)?,
            url: url.to_owned(),
            conditional_updates,
        })
    }
}

/// Why a recording's store could not be found.
#[derive(Debug, thiserror::Error)]
#[error("region {region:?} is not configured on this node")]
pub struct UnknownRegion {
    pub region: String,
}

/// Every configured region's store, and which region is this node's own. Cheap to clone.
#[derive(Clone)]
pub struct Stores {
    home: Region,
    regions: Arc<BTreeMap<Region, RegionStore>>,
}

impl Stores {
    /// # Errors
    /// [`UnknownRegion`] when `home` has no store.
    pub fn new(
        home: Region,
        regions: BTreeMap<Region, RegionStore>,
    ) -> Result<Self, UnknownRegion> {
        if !regions.contains_key(&home) {
            return Err(UnknownRegion {
                region: home.to_string(),
            });
        }
        Ok(Self {
            home,
            regions: Arc::new(regions),
        })
    }

    /// One region, one store: tests and single-region tools.
    pub fn single(home: Region, store: DynStore) -> Self {
        let entry = RegionStore {
            store,
            url: "memory://".to_owned(),
            conditional_updates: true,
        };
        Self {
            regions: Arc::new(BTreeMap::from([(home.clone(), entry)])),
            home,
        }
    }

    /// This node's own region.
    pub fn home(&self) -> &Region {
        &self.home
    }

    /// This node's own region's store.
    pub fn home_store(&self) -> &DynStore {
        &self.regions[&self.home].store
    }

    pub fn region(&self, region: &str) -> Option<&RegionStore> {
        self.regions
            .iter()
            .find(|(r, _)| r.as_str() == region)
            .map(|(_, s)| s)
    }

    /// The store of the region a recording (or event) id names.
    ///
    /// # Errors
    /// [`UnknownRegion`] when that region is not configured here.
    pub fn for_id(&self, id: &RecordingId) -> Result<&DynStore, UnknownRegion> {
        self.region(id.region())
            .map(|s| &s.store)
            .ok_or_else(|| UnknownRegion {
                region: id.region().to_owned(),
            })
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Region, &RegionStore)> {
        self.regions.iter()
    }
}

/// For an `az://` store: what is missing for it to authenticate without falling back to the
/// machine's managed identity (account name and one credential, from `options` or the
/// `AZURE_*` environment). `None` when nothing is missing or the store is not Azure. A region
/// that does use the machine's managed identity says so (`credential_type =
/// "managed_identity"`, or `client_id` for a user-assigned identity).
pub fn missing_credentials(url: &str, options: &BTreeMap<String, String>) -> Option<String> {
    if !matches!(StoreUrl::parse(url), Ok(StoreUrl::Azure { .. })) {
        return None;
    }
    let mut keys: Vec<AzureConfigKey> = options
        .keys()
        .filter_map(|k| AzureConfigKey::from_str(k).ok())
        .collect();
    keys.extend(std::env::vars().filter_map(|(k, _)| {
        k.starts_with("AZURE_")
            .then(|| AzureConfigKey::from_str(&k.to_ascii_lowercase()).ok())
            .flatten()
    }));
    let has = |key: AzureConfigKey| keys.contains(&key);
    if has(AzureConfigKey::UseEmulator) {
        return None;
    }
    if !has(AzureConfigKey::AccountName) {
        return Some("missing credentials: no account_name".to_owned());
    }
    let credential = [
        AzureConfigKey::AccessKey,
        AzureConfigKey::SasKey,
        AzureConfigKey::Token,
        AzureConfigKey::ClientSecret,
        AzureConfigKey::FederatedTokenFile,
        AzureConfigKey::UseAzureCli,
        AzureConfigKey::ClientId,
        AzureConfigKey::MsiResourceId,
        AzureConfigKey::ObjectId,
        AzureConfigKey::CredentialType,
    ]
    .into_iter()
    .any(has);
    (!credential).then(|| {
        "missing credentials: none of access_key, sas_key, client_secret, federated_token_file \
         or client_id (user-assigned identity); set credential_type = \"managed_identity\" \
         to use the machine's identity"
            .to_owned()
    })
}

/// Installs ring as rustls' process-wide provider (idempotent).
pub fn install_crypto_provider() {
    // An Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Writes an immutable object; fails with `AlreadyExists` rather than overwrite.
///
/// # Errors
/// The store's error, unchanged, so callers can [`error_kind`] it.
pub async fn put_create(
    store: &dyn ObjectStore,
    path: &Path,
    bytes: Bytes,
) -> Result<(), object_store::Error> {
    store
        .put_opts(path, PutPayload::from(bytes), PutMode::Create.into())
        .await
        .map(|_| ())
}

/// Writes (or replaces) a mutable object such as a catalog row.
///
/// # Errors
/// The store's error, unchanged.
pub async fn put_overwrite(
    store: &dyn ObjectStore,
    path: &Path,
    bytes: Bytes,
) -> Result<(), object_store::Error> {
    store
        .put_opts(path, PutPayload::from(bytes), PutMode::Overwrite.into())
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_strictly() {
        assert_eq!(
            StoreUrl::parse("file:///tmp/x").unwrap(),
            StoreUrl::File("/tmp/x".into())
        );
        assert_eq!(StoreUrl::parse("memory://").unwrap(), StoreUrl::Memory);
        assert_eq!(
            StoreUrl::parse("az://recordings").unwrap(),
            StoreUrl::Azure {
                container: "recordings".into()
            }
        );
        for bad in [
            "s4://x",
            "az://A",
            "az://ok-name/sub",
            "file://remotehost/x",
            "nonsense",
        ] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
