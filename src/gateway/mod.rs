//! The recording SSH gateway: people connect with plain OpenSSH (`ssh alice%db-prod@gateway`),
//! the gateway ends their SSH connection, opens its own to the target's sshd, proxies the
//! session and streams it to the recorder cluster as Tailscale SSH does.
//!
//! - Authentication: public keys from an authorized-keys file per gateway user
//!   (`authorized_keys = "/etc/castvault/gateway/keys/%u"`), or OpenSSH user certificates
//!   signed by a CA in `user_ca_keys` whose principals name the gateway user. The host key is
//!   made on first start and kept.
//! - Target: named after `%` in the login, or by `[gateway.users.NAME] target`. A target not
//!   configured is refused with a message after authentication, so the user sees why.
//! - Onward: russh client, the target's key (or the gateway's own) and the target's host key
//!   pinned in `known_hosts`; an unknown or changed host key refuses the session.
//! - Recording and failure policy: see [`session`].
//!
//! The russh handler is a thin adapter (CONVENTIONS 15): it authenticates, and hands each
//! session channel to its own task, which owns the onward connection and the recording.

mod recording;
mod session;

pub use recording::Utf8Carry;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use russh::keys::ssh_key::{self, HashAlg, PrivateKey, PublicKey};
use russh::server::{Auth, Msg, Session};
use russh::{Channel, MethodKind, MethodSet};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::admission::{PeerCounts, PeerRate};
use crate::config::Secret;

/// What happens when no recorder accepts a new session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartPolicy {
    /// Refuse the session with a message (Tailscale's `enforceRecorder`).
    Reject,
    /// Let it run unrecorded, with a warning to the user.
    Allow,
}

/// What happens when the recording fails during a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// End the session with a message (Tailscale's `onRecordingFailure` with `terminateSessionWithMessage`).
    Terminate,
    /// Go on unrecorded (fail open).
    Continue,
}

/// `[gateway.targets.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// `host:port` of the target's sshd.
    pub address: String,
    /// User on the target; default: the gateway user.
    pub user: Option<String>,
    /// Private key for this target; default: the gateway's own `client_key`.
    pub key: Option<PathBuf>,
}

/// `[gateway.users.NAME]`: a gateway user whose login names no target.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub target: String,
}

/// `[gateway]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// Default `{data_dir}/gateway/ssh_host_ed25519_key`, made on first start.
    pub host_key: Option<PathBuf>,
    /// The key the gateway signs in to targets with; default `{data_dir}/gateway/id_ed25519`,
    /// made on first start (its `.pub` goes in the targets' authorized_keys).
    pub client_key: Option<PathBuf>,
    /// Authorized keys per gateway user; `%u` is replaced by the user name.
    pub authorized_keys: Option<String>,
    /// CA public keys (OpenSSH format, one per line) trusted to sign user certificates.
    pub user_ca_keys: Option<PathBuf>,
    /// Pinned target host keys (OpenSSH known_hosts format).
    pub known_hosts: Option<PathBuf>,
    /// Recorders, tried in order (as a Tailscale SSH policy lists them).
    pub recorders: Vec<SocketAddr>,
    /// Ingest token (`castvault token new --ingest`) sent as `Authorization: Bearer`.
    pub recorder_token: Option<Secret>,
    pub on_recorder_unavailable: StartPolicy,
    pub on_recording_failure: FailurePolicy,
    /// Record what users type (`i` events); marked in the header.
    pub record_input: bool,
    /// Open connections in total and per address.
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    /// Sessions (channels) per connection.
    pub max_sessions_per_connection: usize,
    /// A connection with no traffic for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Authentication attempts per minute from one address.
    pub auth_attempts_per_minute: u32,
    pub targets: BTreeMap<String, TargetConfig>,
    pub users: BTreeMap<String, UserConfig>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 2222)),
            host_key: None,
            client_key: None,
            authorized_keys: None,
            user_ca_keys: None,
            known_hosts: None,
            recorders: Vec::new(),
            recorder_token: None,
            on_recorder_unavailable: StartPolicy::Reject,
            on_recording_failure: FailurePolicy::Terminate,
            record_input: false,
            // Sessions are long-lived and light; the bound is file descriptors (two each).
            max_connections: 4096,
            max_connections_per_peer: 64,
            // OpenSSH multiplexing opens a few; more is abuse.
            max_sessions_per_connection: 10,
            idle_timeout: Duration::from_secs(3600),
            auth_attempts_per_minute: 30,
            targets: BTreeMap::new(),
            users: BTreeMap::new(),
        }
    }
}

impl GatewayConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(pattern) = &self.authorized_keys
            && !pattern.contains("%u")
        {
            // One file for everyone would let any listed key sign in as any gateway user.
            problems.push(format!(
                "gateway.authorized_keys {pattern:?} must contain %u (one file per gateway user)"
            ));
        }
        if self.authorized_keys.is_none() && self.user_ca_keys.is_none() {
            problems
                .push("gateway: set authorized_keys or user_ca_keys, or nobody can sign in".into());
        }
        if self.recorders.is_empty() && self.on_recorder_unavailable == StartPolicy::Reject {
            problems.push(
                "gateway.recorders: no recorder, and on_recorder_unavailable = \"reject\"".into(),
            );
        }
        for (name, user) in &self.users {
            if !self.targets.contains_key(&user.target) {
                problems.push(format!(
                    "gateway.users.{name}: target {:?} is not configured",
                    user.target
                ));
            }
        }
        for (name, target) in &self.targets {
            if split_host_port(&target.address).is_none() {
                problems.push(format!(
                    "gateway.targets.{name}: address {:?} is not host:port",
                    target.address
                ));
            }
            if name.contains('%') {
                problems.push(format!(
                    "gateway.targets.{name}: a target name cannot contain %"
                ));
            }
        }
        if self.max_connections == 0
            || self.max_connections_per_peer == 0
            || self.max_sessions_per_connection == 0
        {
            problems.push("gateway: connection and session limits must be at least 1".into());
        }
        problems
    }
}

fn split_host_port(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| Some((host.to_owned(), port.parse().ok()?)))?
}

/// Loads an OpenSSH private key, making an Ed25519 one (mode 0600) if the file is absent.
fn load_or_create_key(path: &Path) -> anyhow::Result<PrivateKey> {
    if path.exists() {
        return russh::keys::load_secret_key(path, None)
            .with_context(|| format!("loading {}", path.display()));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let seed: [u8; 32] = rand::random();
    let key = PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&seed));
    let text = key
        .to_openssh(ssh_key::LineEnding::LF)
        .context("encoding a new key")?;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    let public = key
        .public_key()
        .to_openssh()
        .context("encoding a public key")?;
    std::fs::write(
        path.with_extension("pub"),
        format!("{public} castvault-gateway\n"),
    )?;
    tracing::info!(path = %path.display(), "made a new gateway key");
    Ok(key)
}

/// Ciphers the gateway offers its clients: AES-GCM only. An OpenSSH client takes the first of
/// its own list that the server offers (ChaCha20-Poly1305, then the AES-CTR modes with an HMAC,
/// then AES-GCM), so offering any of the others gets them chosen; russh runs ChaCha20 in
/// software and CTR needs a separate SHA-2 HMAC, while AES-GCM runs on the CPU's AES and
/// carry-less multiply instructions (ring). Every OpenSSH since 6.2 has AES-GCM.
pub(crate) const SERVER_CIPHERS: &[russh::cipher::Name] =
    &[russh::cipher::AES_256_GCM, russh::cipher::AES_128_GCM];

/// Ciphers the gateway asks targets for, in order (its own order decides). AES-128-GCM first,
/// as in OpenSSH's own default order: ten AES rounds a block where AES-256 takes fourteen, on
/// both the target's sshd and the gateway.
pub(crate) const CLIENT_CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_128_CTR,
];

/// Everything the gateway's connections share.
pub struct Gateway {
    pub config: GatewayConfig,
    client_key: Arc<PrivateKey>,
    ca_fingerprints: Vec<ssh_key::Fingerprint>,
    known_hosts: PathBuf,
    auth_rate: PeerRate,
    node_id: String,
}

/// Who signed in, and where they go.
#[derive(Debug, Clone)]
pub struct Login {
    pub gateway_user: String,
    /// The target's name as typed (possibly not configured: the session says so).
    pub target: String,
    /// How: `key SHA256:…` or `certificate KEYID`.
    pub method: String,
}

/// Splits `alice%db-prod` into the gateway user and target; a plain `bob` takes his configured
/// target.
fn parse_login(config: &GatewayConfig, login: &str) -> Option<(String, String)> {
    match login.split_once('%') {
        Some((user, target)) if !user.is_empty() && !target.is_empty() => {
            Some((user.to_owned(), target.to_owned()))
        }
        Some(_) => None,
        None => config
            .users
            .get(login)
            .map(|u| (login.to_owned(), u.target.clone())),
    }
}

impl Gateway {
    fn authorized(&self, user: &str, key: &PublicKey) -> bool {
        let Some(pattern) = &self.config.authorized_keys else {
            return false;
        };
        // A user name cannot name another file.
        if user.is_empty() || user.contains(['/', '\\', '\0']) || user.starts_with('.') {
            return false;
        }
        let path = pattern.replace("%u", user);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return false;
        };
        ssh_key::AuthorizedKeys::new(&text)
            .filter_map(Result::ok)
            .any(|entry| entry.public_key().key_data() == key.key_data())
    }

    fn certificate_ok(&self, user: &str, cert: &ssh_key::Certificate) -> Result<(), String> {
        if self.ca_fingerprints.is_empty() {
            return Err("no user CA is configured".into());
        }
        if cert.cert_type() != ssh_key::certificate::CertType::User {
            return Err("not a user certificate".into());
        }
        cert.validate(&self.ca_fingerprints)
            .map_err(|e| format!("certificate not valid: {e}"))?;
        if !cert.valid_principals().iter().any(|p| p == user) {
            return Err(format!(
                "certificate does not name {user:?} among its principals"
            ));
        }
        if cert
            .critical_options()
            .iter()
            .any(|(name, _)| name != "source-address" && name != "force-command")
        {
            return Err("certificate has critical options the gateway does not know".into());
        }
        if cert
            .critical_options()
            .iter()
            .any(|(name, _)| name == "force-command")
        {
            return Err("certificates with force-command are not supported".into());
        }
        Ok(())
    }
}

/// Builds the gateway and serves it on `listener` until `stop`.
///
/// # Errors
/// Keys or files that cannot be loaded.
pub async fn run(
    config: GatewayConfig,
    data_dir: &Path,
    node_id: &str,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let dir = data_dir.join("gateway");
    let host_key = load_or_create_key(
        &config
            .host_key
            .clone()
            .unwrap_or_else(|| dir.join("ssh_host_ed25519_key")),
    )?;
    let client_key = load_or_create_key(
        &config
            .client_key
            .clone()
            .unwrap_or_else(|| dir.join("id_ed25519")),
    )?;
    let ca_fingerprints = match &config.user_ca_keys {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| PublicKey::from_openssh(l).map(|k| k.fingerprint(HashAlg::Sha256)))
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("parsing {}", path.display()))?
        }
        None => Vec::new(),
    };
    let known_hosts = config
        .known_hosts
        .clone()
        .unwrap_or_else(|| dir.join("known_hosts"));
    let mut methods = MethodSet::empty();
    methods.push(MethodKind::PublicKey);
    let server_config = Arc::new(russh::server::Config {
        server_id: russh::SshId::Standard("SSH-2.0-castvault-gateway".into()),
        methods,
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        inactivity_timeout: Some(config.idle_timeout),
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        max_auth_attempts: 6,
        nodelay: true,
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(SERVER_CIPHERS),
            ..Default::default()
        },
        ..Default::default()
    });
    let gateway = Arc::new(Gateway {
        auth_rate: PeerRate::per_minute(config.auth_attempts_per_minute),
        ca_fingerprints,
        known_hosts,
        client_key: Arc::new(client_key),
        node_id: node_id.to_owned(),
        config,
    });
    let slots = Arc::new(Semaphore::new(gateway.config.max_connections));
    let per_peer = PeerCounts::new(gateway.config.max_connections_per_peer);
    let sessions = tokio_util::task::TaskTracker::new();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p?,
            () = stop.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "gateway accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let Some(slot) = per_peer.take(peer.ip()) else {
            tracing::info!(%peer, "gateway: too many connections from this address");
            drop(stream);
            continue;
        };
        let handler = Connection {
            gateway: gateway.clone(),
            peer,
            login: None,
            sessions: Arc::new(Semaphore::new(gateway.config.max_sessions_per_connection)),
            tasks: sessions.clone(),
        };
        let config = server_config.clone();
        let stop = stop.clone();
        sessions.spawn(async move {
            let _ = stream.set_nodelay(true);
            match russh::server::run_stream(config, stream, handler).await {
                Ok(session) => {
                    tokio::select! {
                        result = session => if let Err(e) = result {
                            tracing::debug!(%peer, error = %e, "gateway connection ended with an error");
                        },
                        () = stop.cancelled() => {}
                    }
                }
                Err(e) => tracing::debug!(%peer, error = %e, "gateway handshake failed"),
            }
            drop(slot);
            drop(permit);
        });
    }
    sessions.close();
    sessions.wait().await;
    Ok(())
}

/// One client connection: authentication, then a task per session channel.
struct Connection {
    gateway: Arc<Gateway>,
    peer: SocketAddr,
    login: Option<Login>,
    sessions: Arc<Semaphore>,
    tasks: tokio_util::task::TaskTracker,
}

impl Connection {
    fn rate_limited(&self) -> bool {
        if self.gateway.auth_rate.allow(self.peer.ip()) {
            return false;
        }
        tracing::info!(peer = %self.peer, "gateway: authentication rate limit");
        true
    }
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        _offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // Offers are not attempts (no signature yet); only verified ones count.
        if parse_login(&self.gateway.config, user).is_none() {
            return Ok(Auth::reject());
        }
        Ok(Auth::Accept)
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let Some((gateway_user, target)) = parse_login(&self.gateway.config, user) else {
            return Ok(Auth::reject());
        };
        if self.rate_limited() || !self.gateway.authorized(&gateway_user, key.public_key) {
            tracing::info!(peer = %self.peer, user = %gateway_user, "gateway: key not authorized");
            return Ok(Auth::reject());
        }
        self.login = Some(Login {
            gateway_user,
            target,
            method: format!("key {}", key.public_key.fingerprint(HashAlg::Sha256)),
        });
        Ok(Auth::Accept)
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &ssh_key::Certificate,
    ) -> Result<Auth, Self::Error> {
        let Some((gateway_user, target)) = parse_login(&self.gateway.config, user) else {
            return Ok(Auth::reject());
        };
        if self.rate_limited() {
            return Ok(Auth::reject());
        }
        if let Err(reason) = self.gateway.certificate_ok(&gateway_user, certificate) {
            tracing::info!(peer = %self.peer, user = %gateway_user, %reason, "gateway: certificate refused");
            return Ok(Auth::reject());
        }
        self.login = Some(Login {
            gateway_user,
            target,
            method: format!("certificate {}", certificate.key_id()),
        });
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (Some(login), Ok(permit)) = (
            self.login.clone(),
            self.sessions.clone().try_acquire_owned(),
        ) else {
            reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return Ok(());
        };
        reply.accept().await;
        let task = session::Session {
            gateway: self.gateway.clone(),
            login,
            peer: self.peer,
            handle: session.handle(),
        };
        self.tasks.spawn(async move {
            task.run(channel).await;
            drop(permit);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins() {
        let mut config = GatewayConfig::default();
        config.users.insert(
            "bob".into(),
            UserConfig {
                target: "db".into(),
            },
        );
        assert_eq!(
            parse_login(&config, "alice%db-prod"),
            Some(("alice".into(), "db-prod".into()))
        );
        assert_eq!(
            parse_login(&config, "bob"),
            Some(("bob".into(), "db".into()))
        );
        assert_eq!(parse_login(&config, "carol"), None);
        assert_eq!(parse_login(&config, "%x"), None);
        assert_eq!(split_host_port("[::1]:22"), Some(("::1".into(), 22)));
        assert_eq!(split_host_port("h:x"), None);
    }

    #[test]
    fn shared_authorized_keys_are_refused() {
        let config = GatewayConfig {
            authorized_keys: Some("/etc/castvault/authorized_keys".into()),
            recorders: vec!["127.0.0.1:80".parse().unwrap()],
            ..GatewayConfig::default()
        };
        assert_eq!(config.validate().len(), 1, "{:?}", config.validate());
        let config = GatewayConfig {
            authorized_keys: Some("/etc/castvault/keys/%u".into()),
            ..config
        };
        assert!(config.validate().is_empty(), "{:?}", config.validate());
    }
}
