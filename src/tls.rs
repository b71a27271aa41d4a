//! TLS for the web listener from PEM files (as `tailscale cert` writes them: a certificate
//! chain and a private key), reloaded when they change without a restart.
//!
//! A watcher looks at both files' modification time and size every [`RELOAD_CHECK`]; when they
//! change it loads the pair, checks that the key matches the certificate, and swaps it in for
//! new handshakes. A pair that does not load (a renewal half written, a typo) is logged and the
//! previous certificate keeps serving.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// How often the certificate files are looked at. `tailscale cert` renews days ahead of
/// expiry, so seconds of delay cost nothing and the check is two `stat` calls.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// Time allowed for a TLS handshake; a client that stalls in it holds a connection slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `web_tls`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsConfig {
    pub fn validate(&self) -> Vec<String> {
        match load(&self.cert, &self.key) {
            Ok(_) => Vec::new(),
            Err(e) => vec![format!("web_tls: {e}")],
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads and checks a certificate and key pair.
///
/// # Errors
/// A file that cannot be read or parsed, or a key that does not match the certificate. The
/// message names the file, never its contents.
pub fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("certificate {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "certificate {}: no certificate in it",
            cert.display()
        ));
    }
    let der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("key {}: {e}", key.display()))?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("key {}: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        format!(
            "key {} does not match certificate {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(certified)
}

/// The certificate in use, swapped by the watcher.
#[derive(Debug)]
pub struct Reloading {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

/// Modification time and length of both files: a change in either means reload.
fn stamp(config: &TlsConfig) -> Option<[(SystemTime, u64); 2]> {
    let one = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    Some([one(&config.cert)?, one(&config.key)?])
}

/// Builds the acceptor and spawns the watcher, which stops with `stop`.
///
/// # Errors
/// The files cannot be loaded now.
pub fn acceptor(
    config: &TlsConfig,
    stop: CancellationToken,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    let first = load(&config.cert, &config.key)?;
    let resolver = Arc::new(Reloading {
        current: RwLock::new(Arc::new(first)),
    });
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let config = config.clone();
    tokio::spawn(async move {
        let mut seen = stamp(&config);
        let mut tick = tokio::time::interval(RELOAD_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = stamp(&config);
            if now == seen || now.is_none() {
                continue;
            }
            match load(&config.cert, &config.key) {
                Ok(certified) => {
                    *resolver
                        .current
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(certified);
                    seen = now;
                    tracing::info!(cert = %config.cert.display(), "web TLS certificate reloaded");
                }
                // A pair half written now changes again when the writer finishes.
                Err(e) => {
                    seen = now;
                    tracing::warn!(error = %e, "web TLS certificate not reloaded; keeping the previous one");
                }
            }
        }
    });
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
}
