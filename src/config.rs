//! The node's configuration: one typed, strict tree read from TOML, with every default named
//! here. `castvault config check` runs [`Config::validate`], which reports every problem at once.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use castvault_storage::keys::Region;
use castvault_storage::routing::Rule;
use castvault_storage::store::{RegionStore, StoreUrl, Stores};
use serde::{Deserialize, Serialize};

/// When an ack may count a byte (shared DESIGN.md, "Durability contract").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AckLevel {
    /// Bytes are fsynced in the local spool.
    Spool,
    /// Bytes are in a chunk committed to the object store.
    Storage,
}

/// What to do with `ack = "storage"` streams when the store cannot take their chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutagePolicy {
    /// Keep recording; ack at spool level until the store returns.
    Degrade,
    /// End the stream with the final error frame so the client's failure policy applies.
    Fail,
}

/// A secret config value; never printed.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// How a recording is cut into chunks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkConfig {
    /// Cut a chunk once this many raw bytes are pending.
    #[serde(default = "default_chunk_max_bytes")]
    pub max_bytes: usize,
    /// Cut a chunk this long after its first byte arrived.
    #[serde(default = "default_chunk_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// zstd level of chunks compressed while the node is behind (or of every chunk with
    /// `adaptive_compression` off). 1 is the default: on terminal output it stored less than 3
    /// at about twice the speed (shared DEPENDENCIES.md measured ratio 4.71 vs 4.60 on its
    /// corpus; the bench corpus in 4 MiB chunks gave 23.49 MB vs 23.61 MB).
    #[serde(default = "default_compression_level")]
    pub compression_level: i32,
    /// Compress chunks with zstd's lazy parser (about 7% smaller than level 1 on terminal
    /// output, at under a third of its speed) while the node is lightly loaded and keeps up,
    /// at `compression_level` otherwise.
    #[serde(default = "default_true")]
    pub adaptive_compression: bool,
}

impl Default for ChunkConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_chunk_max_bytes(),
            max_age: default_chunk_max_age(),
            compression_level: default_compression_level(),
            adaptive_compression: true,
        }
    }
}

fn default_chunk_max_bytes() -> usize {
    4 << 20
}
fn default_chunk_max_age() -> Duration {
    Duration::from_secs(5)
}
fn default_compression_level() -> i32 {
    1
}
fn default_true() -> bool {
    true
}

/// The node configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node's name, unique in its region; defaults to the host name.
    pub node_id: String,
    pub region: String,
    pub zone: String,
    /// Spool (and the default store) live here.
    pub data_dir: PathBuf,
    /// Store URL (`file:///abs`, `az://container`, `memory://`); default: `{data_dir}/store`.
    pub store: Option<String>,
    /// Store settings (Azure keys such as `account_name`, `access_key`, `sas_key`,
    /// `use_emulator`, `endpoint`); environment variables fill in the rest.
    pub store_options: BTreeMap<String, Secret>,
    /// Ack level; default `storage` for a remote store, `spool` for the local disk.
    pub ack: Option<AckLevel>,
    pub storage_outage: OutagePolicy,
    /// Upload listener; Tailscale clients expect port 80 in production.
    pub ingest_listen: SocketAddr,
    /// Health, metrics and API listener.
    pub web_listen: SocketAddr,
    pub chunk: ChunkConfig,
    /// Longest asciicast line accepted; a longer line ends the stream with an error frame.
    pub max_line_bytes: usize,
    /// New recordings are refused with 503 while the spool's disk has less free space.
    pub min_free_disk_bytes: u64,
    /// Recordings open at once; more are refused with 503 so the client tries the next recorder.
    pub max_open_recordings: usize,
    /// How long streams may run on after SIGTERM before they get the final error frame. Keep it
    /// under the orchestrator's grace period (Kubernetes: 30 s by default) minus `upload_grace`.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Time given to the uploader after the streams are closed; what is left resumes on restart.
    #[serde(with = "humantime_serde")]
    pub upload_grace: Duration,
    /// Who may use the web UI and API (see `auth`).
    pub access: crate::auth::AccessConfig,
    /// The catalog database (a cache; it grows with the transcripts of the recordings, so it
    /// may live on another disk than the spool); default `{data_dir}/catalog.sqlite`.
    pub catalog: Option<PathBuf>,
    /// Other regions' stores (and optionally this region's, instead of `store`): this node
    /// lists, plays and exports every region's recordings and may receive recordings whose
    /// home is another region (see `routing`).
    pub regions: BTreeMap<String, RegionConfig>,
    /// Rules choosing a recording's home region from its header; first match wins, else this
    /// node's region (see `castvault_storage::routing`).
    pub routing: Vec<Rule>,
    /// How long a recording's lease lasts unless renewed; a peer finalizes an orphan once its
    /// lease has gone unrenewed this long. Renewed every third of it.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// A recording being received gets a signed checkpoint of its chain this often (at most a
    /// minute, so a recording cut short by a crash verifies up to a recent point).
    #[serde(with = "humantime_serde")]
    pub checkpoint_every: Duration,
    /// Retention rules (see `crate::retention`): the longest matching `keep_days` wins; a
    /// recording no rule matches is kept.
    pub retention: Vec<crate::retention::RetentionRule>,
    /// Who may send recordings (see `crate::admission`).
    pub admission: crate::admission::AdmissionConfig,
    /// Per-peer and total bounds on the ingest listener (see `crate::admission`).
    pub limits: crate::admission::LimitsConfig,
    /// TLS for the web listener, from certificate files (as `tailscale cert` writes them);
    /// reloaded when they change.
    pub web_tls: Option<crate::tls::TlsConfig>,
    /// Serve the web UI over plain HTTP on a non-loopback address (behind a TLS-terminating
    /// proxy such as `tailscale serve`). Without it, a non-loopback `web_listen` needs `web_tls`.
    pub allow_plain_http: bool,
    /// The recording SSH gateway (`castvault gateway`; see `crate::gateway`).
    pub gateway: Option<crate::gateway::GatewayConfig>,
}

/// One region's store.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// Store URL (`az://container`, `file:///abs`, `memory://`).
    pub store: String,
    #[serde(default)]
    pub store_options: BTreeMap<String, Secret>,
    /// Regions that may hold this region's new recordings while its store is unreachable,
    /// where data residency allows; tried in order.
    #[serde(default)]
    pub failover: Vec<String>,
}

fn exposed(options: &BTreeMap<String, Secret>) -> BTreeMap<String, String> {
    options
        .iter()
        .map(|(k, v)| (k.clone(), v.expose().to_owned()))
        .collect()
}

/// An error and its sources on one line.
fn error_text(e: &dyn std::error::Error) -> String {
    crate::upload::error_chain(e)
}

fn default_node_id() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned())
}

/// Why a config file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_id: default_node_id(),
            region: "local".to_owned(),
            zone: "local".to_owned(),
            data_dir: PathBuf::from("./castvault-data"),
            store: None,
            store_options: BTreeMap::new(),
            ack: None,
            storage_outage: OutagePolicy::Degrade,
            ingest_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            web_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            chunk: ChunkConfig::default(),
            max_line_bytes: 8 << 20,
            min_free_disk_bytes: 256 << 20,
            max_open_recordings: 12_000,
            drain_timeout: Duration::from_secs(15),
            upload_grace: Duration::from_secs(10),
            access: crate::auth::AccessConfig::default(),
            catalog: None,
            regions: BTreeMap::new(),
            routing: Vec::new(),
            lease_ttl: Duration::from_secs(30),
            checkpoint_every: castvault_storage::signing::CHECKPOINT_EVERY,
            retention: Vec::new(),
            admission: crate::admission::AdmissionConfig::default(),
            limits: crate::admission::LimitsConfig::default(),
            web_tls: None,
            allow_plain_http: false,
            gateway: None,
        }
    }
}

impl Config {
    /// Loads a config file, or the defaults when `path` is `None`.
    ///
    /// # Errors
    /// [`ConfigError`] when the file cannot be read or parsed (unknown keys included).
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// This region's store URL: `store`, else `[regions.{region}]`, else `{data_dir}/store` on
    /// local disk.
    pub fn store_url(&self) -> String {
        if let (None, Some(own)) = (&self.store, self.regions.get(&self.region)) {
            return own.store.clone();
        }
        match &self.store {
            Some(url) => url.clone(),
            None => {
                let dir = std::path::absolute(self.data_dir.join("store"))
                    .unwrap_or_else(|_| self.data_dir.join("store"));
                format!("file://{}", dir.display())
            }
        }
    }

    pub fn store_options(&self) -> BTreeMap<String, String> {
        let options = match (&self.store, self.regions.get(&self.region)) {
            (None, Some(own)) => &own.store_options,
            _ => &self.store_options,
        };
        exposed(options)
    }

    /// Every region this node knows, with its store URL and options; this node's own first.
    pub fn region_stores(&self) -> Vec<(String, String, BTreeMap<String, String>)> {
        let mut all = vec![(self.region.clone(), self.store_url(), self.store_options())];
        for (name, region) in &self.regions {
            if *name != self.region {
                all.push((
                    name.clone(),
                    region.store.clone(),
                    exposed(&region.store_options),
                ));
            }
        }
        all
    }

    /// Opens every region's store.
    ///
    /// # Errors
    /// The first region whose name or store is invalid.
    pub fn open_stores(&self) -> Result<Stores, String> {
        let mut regions = BTreeMap::new();
        for (name, url, options) in self.region_stores() {
            let region = Region::new(&name).map_err(|e| e.to_string())?;
            let store = RegionStore::open(&url, &options)
                .map_err(|e| format!("region {name}: {}", error_text(&e)))?;
            regions.insert(region, store);
        }
        Stores::new(self.region()?, regions).map_err(|e| e.to_string())
    }

    /// The regions that may take `region`'s new recordings while its store is down.
    pub fn failover(&self, region: &str) -> &[String] {
        self.regions
            .get(region)
            .map_or(&[][..], |r| r.failover.as_slice())
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.data_dir.join("spool")
    }

    /// The catalog database, a cache of the store's catalog rows and transcripts.
    pub fn catalog_path(&self) -> PathBuf {
        self.catalog
            .clone()
            .unwrap_or_else(|| self.data_dir.join("catalog.sqlite"))
    }

    /// The ack level in force: the configured one, else by store kind.
    pub fn ack_level(&self) -> AckLevel {
        self.ack
            .unwrap_or(match StoreUrl::parse(&self.store_url()) {
                Ok(StoreUrl::Azure { .. } | StoreUrl::S3 { .. } | StoreUrl::Gcs { .. }) => {
                    AckLevel::Storage
                }
                _ => AckLevel::Spool,
            })
    }

    pub fn region(&self) -> Result<Region, String> {
        Region::new(&self.region).map_err(|e| e.to_string())
    }

    /// Every problem with this config, empty when it is valid.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = self.region() {
            problems.push(e);
        }
        if self.node_id.is_empty() || self.node_id.len() > 64 || self.node_id.contains(['/', '\\'])
        {
            problems.push(format!(
                "node_id {:?} must be 1 to 64 characters without slashes",
                self.node_id
            ));
        }
        problems.extend(self.validate_regions());
        if !(1 << 10..=64 << 20).contains(&self.chunk.max_bytes) {
            problems.push(format!(
                "chunk.max_bytes {} must be between 1 KiB and 64 MiB",
                self.chunk.max_bytes
            ));
        }
        if self.chunk.max_age.is_zero() || self.chunk.max_age > Duration::from_secs(600) {
            problems.push("chunk.max_age must be between 1ms and 10m".to_owned());
        }
        if !(1..=19).contains(&self.chunk.compression_level) {
            problems.push(format!(
                "chunk.compression_level {} must be 1 to 19",
                self.chunk.compression_level
            ));
        }
        if !(1 << 10..=128 << 20).contains(&self.max_line_bytes) {
            problems.push(format!(
                "max_line_bytes {} must be between 1 KiB and 128 MiB",
                self.max_line_bytes
            ));
        }
        if self.max_open_recordings == 0 {
            problems.push("max_open_recordings must be at least 1".to_owned());
        }
        if self.ingest_listen == self.web_listen && self.ingest_listen.port() != 0 {
            problems.push(format!(
                "ingest_listen and web_listen are both {}",
                self.ingest_listen
            ));
        }
        if self.lease_ttl < Duration::from_secs(3) || self.lease_ttl > Duration::from_secs(600) {
            problems.push("lease_ttl must be between 3s and 10m".to_owned());
        }
        if self.checkpoint_every < Duration::from_secs(1)
            || self.checkpoint_every > castvault_storage::signing::CHECKPOINT_EVERY
        {
            problems.push("checkpoint_every must be between 1s and 1m".to_owned());
        }
        problems.extend(self.access.validate());
        problems.extend(self.admission.validate());
        problems.extend(self.limits.validate());
        if self.web_tls.is_none() && !self.allow_plain_http && !self.web_listen.ip().is_loopback() {
            problems.push(format!(
                "web_listen {} is not loopback: set web_tls (certificate files), or \
                 allow_plain_http = true behind a TLS-terminating proxy",
                self.web_listen
            ));
        }
        if let Some(tls) = &self.web_tls {
            problems.extend(tls.validate());
        }
        if let Some(gateway) = &self.gateway {
            problems.extend(gateway.validate());
        }
        problems
    }

    /// Regions, their stores and credentials, failover lists and routing rules.
    fn validate_regions(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.store.is_some() && self.regions.contains_key(&self.region) {
            problems.push(format!(
                "this node's region {:?} has a store both in `store` and in [regions.{}]",
                self.region, self.region
            ));
        }
        for (name, url, options) in self.region_stores() {
            if name != self.region
                && let Err(e) = Region::new(&name)
            {
                problems.push(e.to_string());
            }
            match RegionStore::open(&url, &options) {
                Err(e) => problems.push(format!("region {name}: store: {}", error_text(&e))),
                Ok(_) => {
                    if let Some(missing) =
                        castvault_storage::store::missing_credentials(&url, &options)
                    {
                        problems.push(format!("region {name}: {missing}"));
                    }
                }
            }
        }
        let known = |r: &str| r == self.region || self.regions.contains_key(r);
        for (name, region) in &self.regions {
            for f in &region.failover {
                if !known(f) {
                    problems.push(format!(
                        "region {name}: failover region {f:?} is not configured"
                    ));
                } else if f == name {
                    problems.push(format!("region {name}: fails over to itself"));
                }
            }
        }
        for (i, rule) in self.routing.iter().enumerate() {
            if !known(&rule.region) {
                problems.push(format!(
                    "routing rule {}: region {:?} is not configured (known: {})",
                    i + 1,
                    rule.region,
                    self.region_stores()
                        .iter()
                        .map(|(n, ..)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        problems.extend(castvault_storage::routing::unreachable_rules(&self.routing));
        for (i, rule) in self.retention.iter().enumerate() {
            if rule.keep_days == 0 {
                problems.push(format!(
                    "retention rule {}: keep_days must be at least 1",
                    i + 1
                ));
            }
            for region in &rule.region {
                if !region.contains('*') && !known(region) {
                    problems.push(format!(
                        "retention rule {}: region {region:?} is not configured",
                        i + 1
                    ));
                }
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_local() {
        let c = Config::default();
        assert_eq!(c.ack_level(), AckLevel::Spool);
        assert!(c.store_url().starts_with("file:///"));
        assert_eq!(c.chunk.max_bytes, 4 << 20);
    }

    #[test]
    fn regions_rules_failover_and_credentials_are_checked() {
        let c: Config = toml::from_str(
            r#"region = "eu"
[regions.eu]
store = "memory://"
failover = ["nowhere", "eu"]
[regions.us]
store = "az://recordings"
store_options = { account_name = "acct" }
[[routing]]
region = "mars"
src_node_tags = ["tag:mars"]
[[routing]]
region = "us"
[[routing]]
region = "eu"
ssh_user = ["root"]
"#,
        )
        .unwrap();
        let problems = c.validate().join("\n");
        for expected in [
            "failover region \"nowhere\" is not configured",
            "region eu: fails over to itself",
            "region us: missing credentials",
            "routing rule 1: region \"mars\" is not configured",
            "routing rule 3 (region \"eu\") is unreachable",
        ] {
            assert!(
                problems.contains(expected),
                "{expected:?} not in:\n{problems}"
            );
        }
        let ok: Config = toml::from_str(
            r#"region = "eu"
[regions.eu]
store = "memory://"
[regions.us]
store = "az://recordings"
store_options = { account_name = "acct", credential_type = "managed_identity" }
[[routing]]
region = "us"
src_node_tags = ["tag:us"]
"#,
        )
        .unwrap();
        assert!(ok.validate().is_empty(), "{:?}", ok.validate());
        assert_eq!(ok.open_stores().unwrap().iter().count(), 2);
    }

    #[test]
    fn unknown_keys_and_every_problem_are_reported() {
        assert!(toml::from_str::<Config>("nonsense = 1").is_err());
        let c: Config = toml::from_str(
            "region = \"Bad Region\"\nstore = \"s4://x\"\n[chunk]\ncompression_level = 99\nmax_age = \"0s\"\n",
        )
        .unwrap();
        let problems = c.validate();
        assert!(problems.len() >= 4, "{problems:?}");
        let azure: Config =
            toml::from_str("store = \"az://recordings\"\n[store_options]\naccess_key = \"k\"")
                .unwrap();
        assert_eq!(azure.ack_level(), AckLevel::Storage);
        assert!(!format!("{azure:?}").contains("\"k\""));
    }
}
