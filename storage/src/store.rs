//! Opening stores from URLs and classifying their errors.
//!
//! | URL | store |
//! | --- | --- |
//! | `file:///abs/path` | local disk, fsync on every put (the embedded default) |
//! | `az://CONTAINER` | Azure Blob through object_store. Settings come from the environment (`AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_SAS_KEY`, `AZURE_FEDERATED_TOKEN_FILE` for workload identity, managed identity by default, `AZURE_STORAGE_USE_EMULATOR` for Azurite) and from the config's `store_options`, which win. |
//! | `s3://BUCKET` | Amazon S3 or an S3-compatible store. Settings come from the `AWS_*` environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL` for S3-compatible stores, `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN` for IRSA, ECS container credentials), else from a shared-credentials profile (`AWS_PROFILE`, default `default`, in `~/.aws/credentials` and `~/.aws/config`), else from the EC2 instance role (IMDSv2); the config's `store_options` win over all of them. |
//! | `gs://BUCKET` | Google Cloud Storage. Settings from `GOOGLE_SERVICE_ACCOUNT` (a key file) or `GOOGLE_SERVICE_ACCOUNT_KEY`, else application default credentials, else the GCE/GKE metadata server; `store_options` win. |
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
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::GoogleCloudStorageBuilder;
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
    S3 { bucket: String },
    Gcs { bucket: String },
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
            scheme @ ("s3" | "gs") => {
                let bucket = parsed.host_str().unwrap_or_default();
                // The rules both clouds share: 3 to 63 of a-z, 0-9, '.', '-', starting and
                // ending with a letter or digit (GCS also allows '_').
                let edge =
                    |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
                let valid = (3..=63).contains(&bucket.len())
                    && bucket.bytes().all(|b| {
                        b.is_ascii_lowercase()
                            || b.is_ascii_digit()
                            || b == b'.'
                            || b == b'-'
                            || (b == b'_' && scheme == "gs")
                    })
                    && edge(bucket.bytes().next())
                    && edge(bucket.bytes().last());
                if !valid || !parsed.path().trim_matches('/').is_empty() {
                    return Err(invalid(&format!(
                        "expected {scheme}://BUCKET (3 to 63 of a-z, 0-9, '.', '-')"
                    )));
                }
                let bucket = bucket.to_owned();
                Ok(if scheme == "s3" {
                    Self::S3 { bucket }
                } else {
                    Self::Gcs { bucket }
                })
            }
            other => Err(invalid(&format!(
                "unsupported scheme {other:?} (file, az, s3, gs, memory)"
            ))),
        }
    }
}

/// Opens the store a URL names.
///
/// # Errors
/// [`StoreError`] for a bad URL, an unknown option or a store that cannot be built.
pub fn open(url: &str, options: &BTreeMap<String, String>) -> Result<DynStore, StoreError> {
    open_with(url, options, retry_config())
}

fn open_with(
    url: &str,
    options: &BTreeMap<String, String>,
    retry: RetryConfig,
) -> Result<DynStore, StoreError> {
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
            let builder = MicrosoftAzureBuilder::from_env().with_container_name(container);
            let builder = configure(url, options, builder, MicrosoftAzureBuilder::with_config)?;
            finish(url, builder.with_retry(retry.clone()).build())
        }
        StoreUrl::S3 { bucket } => {
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
            let explicit_key = std::env::var_os("AWS_ACCESS_KEY_ID").is_some()
                || options.keys().any(|k| {
                    matches!(
                        AmazonS3ConfigKey::from_str(k),
                        Ok(AmazonS3ConfigKey::AccessKeyId)
                    )
                });
            if !explicit_key {
                for (key, value) in aws_profile::settings() {
                    builder = builder.with_config(key, value);
                }
            }
            let builder = configure(url, options, builder, AmazonS3Builder::with_config)?;
            finish(url, builder.with_retry(retry.clone()).build())
        }
        StoreUrl::Gcs { bucket } => {
            let builder = GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket);
            let builder = configure(
                url,
                options,
                builder,
                GoogleCloudStorageBuilder::with_config,
            )?;
            finish(url, builder.with_retry(retry.clone()).build())
        }
    }
}

/// Applies the config's `store_options` to a cloud store's builder; a key the store does not
/// know is an error, not ignored.
fn configure<B, K: FromStr>(
    url: &str,
    options: &BTreeMap<String, String>,
    mut builder: B,
    with: impl Fn(B, K, String) -> B,
) -> Result<B, StoreError> {
    install_crypto_provider();
    for (key, value) in options {
        let key = K::from_str(key).map_err(|_| StoreError::UnknownOption {
            url: url.to_owned(),
            key: key.clone(),
        })?;
        builder = with(builder, key, value.clone());
    }
    Ok(builder)
}

fn finish<S: ObjectStore>(
    url: &str,
    built: Result<S, object_store::Error>,
) -> Result<DynStore, StoreError> {
    let store = built.map_err(|source| StoreError::Open {
        url: url.to_owned(),
        source,
    })?;
    Ok(Arc::new(store))
}

/// AWS shared-credentials profiles, which object_store does not read itself: static keys from
/// `AWS_SHARED_CREDENTIALS_FILE` (default `~/.aws/credentials`) and the region from
/// `AWS_CONFIG_FILE` (default `~/.aws/config`), for the profile `AWS_PROFILE` names (default
/// `default`). Profiles that assume roles or use SSO are not followed; use IRSA
/// (`AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`) or the instance role for those.
mod aws_profile {
    use std::path::PathBuf;

    use object_store::aws::AmazonS3ConfigKey;

    pub fn settings() -> Vec<(AmazonS3ConfigKey, String)> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let file = |var: &str, default: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".aws").join(default)))
        };
        let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".to_owned());
        let read = |path: Option<PathBuf>| path.and_then(|p| std::fs::read_to_string(p).ok());
        let mut out = Vec::new();
        if let Some(text) = read(file("AWS_SHARED_CREDENTIALS_FILE", "credentials")) {
            for (key, value) in section(&text, &profile) {
                let key = match key.as_str() {
                    "aws_access_key_id" => AmazonS3ConfigKey::AccessKeyId,
                    "aws_secret_access_key" => AmazonS3ConfigKey::SecretAccessKey,
                    "aws_session_token" => AmazonS3ConfigKey::Token,
                    _ => continue,
                };
                out.push((key, value));
            }
        }
        // Only when the environment did not name a region.
        if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
            && let Some(text) = read(file("AWS_CONFIG_FILE", "config"))
        {
            let name = if profile == "default" {
                profile.clone()
            } else {
                format!("profile {profile}")
            };
            out.extend(
                section(&text, &name)
                    .into_iter()
                    .filter(|(k, _)| k == "region")
                    .map(|(_, v)| (AmazonS3ConfigKey::Region, v)),
            );
        }
        out
    }

    /// The `key = value` lines of `[name]` in an INI file.
    pub fn section(text: &str, name: &str) -> Vec<(String, String)> {
        let mut inside = false;
        let mut out = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                inside = header.trim() == name;
            } else if inside && let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        out
    }
}

/// One region's store.
#[derive(Clone)]
pub struct RegionStore {
    pub store: DynStore,
    /// The same store without request retries, for health probes: while the store is down,
    /// a probe answers at once, so its return is seen within one probe interval.
    pub probe: DynStore,
    /// The URL it was opened from (no secrets: options are kept apart).
    pub url: String,
    /// Conditional updates on ETags work (Azure, S3, GCS, memory); the local disk has none, so
    /// leases there are single-node (see `castvault::lease`).
    pub conditional_updates: bool,
}

impl RegionStore {
    /// Opens the store `url` names.
    ///
    /// # Errors
    /// As [`open`].
    pub fn open(url: &str, options: &BTreeMap<String, String>) -> Result<Self, StoreError> {
        let parsed = StoreUrl::parse(url)?;
        let conditional_updates = !matches!(parsed, StoreUrl::File(_));
        let store = open(url, options)?;
        let probe = match parsed {
            // Local stores do not retry, and a second in-memory store would be another store.
            StoreUrl::File(_) | StoreUrl::Memory => store.clone(),
            _ => open_with(
                url,
                options,
                RetryConfig {
                    max_retries: 0,
                    ..retry_config()
                },
            )?,
        };
        Ok(Self {
            store,
            probe,
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
            probe: store.clone(),
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
    fn profile_sections_are_read() {
        let text = "[default]\naws_access_key_id = A\n# note\n[profile ops]\nregion=eu-west-1\n[ops]\naws_secret_access_key = S\n";
        assert_eq!(
            aws_profile::section(text, "default"),
            [("aws_access_key_id".to_owned(), "A".to_owned())]
        );
        assert_eq!(
            aws_profile::section(text, "profile ops"),
            [("region".to_owned(), "eu-west-1".to_owned())]
        );
        assert_eq!(
            aws_profile::section(text, "ops"),
            [("aws_secret_access_key".to_owned(), "S".to_owned())]
        );
        assert!(aws_profile::section(text, "none").is_empty());
    }

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
        assert_eq!(
            StoreUrl::parse("s3://castvault.rec-1").unwrap(),
            StoreUrl::S3 {
                bucket: "castvault.rec-1".into()
            }
        );
        assert_eq!(
            StoreUrl::parse("gs://rec_eu").unwrap(),
            StoreUrl::Gcs {
                bucket: "rec_eu".into()
            }
        );
        for bad in [
            "s4://x",
            "az://A",
            "az://ok-name/sub",
            "s3://Bad",
            "s3://-edge",
            "s3://b/sub",
            "gs://x",
            "file://remotehost/x",
            "nonsense",
        ] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
