//! Who may use the web UI and API, and what they may see.
//!
//! A request is authenticated by the first of these that applies:
//! 1. a static token (`Authorization: Bearer …`, or the `castvault_token` cookie the login page
//!    sets); tokens are stored as SHA-256 hashes, never in clear;
//! 2. a trusted reverse proxy's identity header (e.g. `Tailscale-User-Login`, which
//!    `tailscale serve` adds), honoured only from the proxy addresses configured;
//! 3. tailscaled's WhoIs of the connecting peer, asked over its LocalAPI unix socket
//!    (`GET /localapi/v0/whois?addr=IP:PORT`), the way tsrecorder identifies users: the login
//!    name of the user, or the tags of a tagged device.
//!
//! Tokens carry their own role and scope. Identities from a proxy or WhoIs get theirs from the
//! first grant that names them (a login name, a device tag, or `*`); one named by no grant is
//! refused. Roles: `viewer` (list, search, play, watch live), `auditor` (also export and read
//! the audit log), `admin` (everything). A scope limits which recordings a person sees: by the
//! recording's node tags, its Tailscale user, its region. Out-of-scope recordings answer 404
//! as if they did not exist.
//!
//! With no `[access]` section the node makes one admin token on first start, stores it in
//! `{data_dir}/admin-token` (mode 0600) and logs that file's path, never the token.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::http::HeaderMap;
use castvault_storage::manifest::CatalogRow;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::catalog::Scope;

/// The cookie the login page sets.
pub const TOKEN_COOKIE: &str = "castvault_token";

/// Time allowed for one WhoIs answer from tailscaled.
const WHOIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest WhoIs answer read (a node with many capabilities is a few KiB).
const WHOIS_MAX_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Auditor,
    Admin,
}

/// A scope as configured; absent fields do not restrict.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ScopeConfig {
    pub tags: Option<Vec<String>>,
    pub users: Option<Vec<String>>,
    pub regions: Option<Vec<String>>,
}

impl ScopeConfig {
    fn scope(&self) -> Scope {
        Scope {
            tags: self.tags.clone(),
            users: self.users.clone(),
            regions: self.regions.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Shown in the audit log as the actor.
    pub name: String,
    /// Hex SHA-256 of the token (`castvault token new` prints both).
    pub sha256: String,
    pub role: Role,
    #[serde(default)]
    pub scope: ScopeConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// The header carrying the user's login, e.g. `Tailscale-User-Login`.
    pub header: String,
    /// Peers allowed to set it (CIDRs); requests from anywhere else have it ignored.
    pub trusted: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    /// Login names, device tags (`tag:…`), or `*` for anyone authenticated.
    pub users: Vec<String>,
    pub role: Role,
    #[serde(default)]
    pub scope: ScopeConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    pub tokens: Vec<TokenConfig>,
    pub proxy: Option<ProxyConfig>,
    /// tailscaled's LocalAPI socket, e.g. `/var/run/tailscale/tailscaled.sock`.
    pub whois_socket: Option<PathBuf>,
    pub grants: Vec<GrantConfig>,
}

impl AccessConfig {
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty() && self.proxy.is_none() && self.whois_socket.is_none()
    }

    /// Problems for `config check`.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for t in &self.tokens {
            if t.sha256.len() != 64 || hex::decode(&t.sha256).is_err() {
                problems.push(format!(
                    "access.tokens {:?}: sha256 must be 64 hex digits (the token's SHA-256)",
                    t.name
                ));
            }
        }
        if let Some(proxy) = &self.proxy {
            for cidr in &proxy.trusted {
                if Cidr::parse(cidr).is_none() {
                    problems.push(format!("access.proxy.trusted: {cidr:?} is not a CIDR"));
                }
            }
            if axum::http::HeaderName::try_from(proxy.header.as_str()).is_err() {
                problems.push(format!(
                    "access.proxy.header: {:?} is not a header name",
                    proxy.header
                ));
            }
        }
        if (self.proxy.is_some() || self.whois_socket.is_some()) && self.grants.is_empty() {
            problems.push(
                "access: proxy or WhoIs logins need at least one [[access.grants]] entry".into(),
            );
        }
        problems
    }
}

/// An IP network.
#[derive(Debug, Clone, Copy)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Option<Self> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?),
            None => {
                let a = text.parse::<IpAddr>().ok()?;
                (a, if a.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Who is asking, with what role and scope.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    /// `token`, `proxy` or `whois`.
    pub via: &'static str,
    pub role: Role,
    pub scope: Scope,
}

impl Identity {
    pub fn may_see(&self, row: &CatalogRow) -> bool {
        self.scope.allows(row)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("not signed in")]
    Unauthenticated,
    #[error("{0} has no access to castvault")]
    NoGrant(String),
}

struct Token {
    name: String,
    digest: [u8; 32],
    role: Role,
    scope: Scope,
}

struct Proxy {
    header: axum::http::HeaderName,
    trusted: Vec<Cidr>,
}

pub struct Access {
    tokens: Vec<Token>,
    proxy: Option<Proxy>,
    whois_socket: Option<PathBuf>,
    grants: Vec<GrantConfig>,
}

pub(crate) fn sha256(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// Compares digests in constant time.
pub(crate) fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Makes a new random token; returns it and its hex SHA-256.
pub fn new_token() -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let token = hex::encode(bytes);
    let digest = hex::encode(sha256(&token));
    (token, digest)
}

impl Access {
    /// Builds the access rules. With an empty config, makes (or reuses) the admin token in
    /// `data_dir`.
    ///
    /// # Errors
    /// The admin token file cannot be read or written.
    pub fn new(config: &AccessConfig, data_dir: &Path) -> std::io::Result<Self> {
        let mut tokens: Vec<Token> = config
            .tokens
            .iter()
            .filter_map(|t| {
                let digest: [u8; 32] = hex::decode(&t.sha256).ok()?.try_into().ok()?;
                Some(Token {
                    name: t.name.clone(),
                    digest,
                    role: t.role,
                    scope: t.scope.scope(),
                })
            })
            .collect();
        if config.is_empty() {
            let path = data_dir.join("admin-token");
            let token = admin_token(&path)?;
            tracing::info!(path = %path.display(), "no [access] configured: sign in to the web UI with the admin token in this file");
            tokens.push(Token {
                name: "admin".into(),
                digest: sha256(&token),
                role: Role::Admin,
                scope: Scope::default(),
            });
        }
        let proxy = config.proxy.as_ref().and_then(|p| {
            Some(Proxy {
                header: axum::http::HeaderName::try_from(p.header.as_str()).ok()?,
                trusted: p.trusted.iter().filter_map(|c| Cidr::parse(c)).collect(),
            })
        });
        Ok(Self {
            tokens,
            proxy,
            whois_socket: config.whois_socket.clone(),
            grants: config.grants.clone(),
        })
    }

    fn by_token(&self, token: &str) -> Option<Identity> {
        let digest = sha256(token);
        self.tokens
            .iter()
            .find(|t| same(&t.digest, &digest))
            .map(|t| Identity {
                name: t.name.clone(),
                via: "token",
                role: t.role,
                scope: t.scope.clone(),
            })
    }

    fn granted(
        &self,
        name: &str,
        tags: &[String],
        via: &'static str,
    ) -> Result<Identity, AuthError> {
        let grant = self
            .grants
            .iter()
            .find(|g| {
                g.users
                    .iter()
                    .any(|u| u == "*" || u == name || tags.contains(u))
            })
            .ok_or_else(|| AuthError::NoGrant(name.to_owned()))?;
        Ok(Identity {
            name: name.to_owned(),
            via,
            role: grant.role,
            scope: grant.scope.scope(),
        })
    }

    /// Authenticates a request from `peer`.
    ///
    /// # Errors
    /// [`AuthError`] when nothing identifies the requester or no grant names them.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: SocketAddr,
    ) -> Result<Identity, AuthError> {
        if let Some(token) = bearer(headers).or_else(|| cookie(headers, TOKEN_COOKIE)) {
            return self.by_token(&token).ok_or(AuthError::Unauthenticated);
        }
        if let Some(proxy) = &self.proxy
            && proxy.trusted.iter().any(|c| c.contains(peer.ip()))
            && let Some(login) = headers.get(&proxy.header).and_then(|v| v.to_str().ok())
            && !login.trim().is_empty()
        {
            return self.granted(login.trim(), &[], "proxy");
        }
        if let Some(socket) = &self.whois_socket {
            match whois(socket, peer).await {
                Ok(Some(who)) => return self.granted(&who.name, &who.tags, "whois"),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "tailscaled WhoIs failed"),
            }
        }
        Err(AuthError::Unauthenticated)
    }

    /// Checks a token typed into the login page.
    pub fn check_token(&self, token: &str) -> bool {
        self.by_token(token.trim()).is_some()
    }
}

fn admin_token(path: &Path) -> std::io::Result<String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let token = text.trim().to_owned();
        if !token.is_empty() {
            return Ok(token);
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let (token, _) = new_token();
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(format!("{token}\n").as_bytes())?;
    file.sync_all()?;
    Ok(token)
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(|t| t.trim().to_owned())
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.to_owned())
        })
}

/// What WhoIs says about a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhoIs {
    /// The user's login name; for a tagged device, its node name.
    pub name: String,
    pub tags: Vec<String>,
    /// The node's MagicDNS name, without the final dot.
    pub node: String,
    /// The node's stable id (`StableID`, e.g. `nStable1CNTRL`).
    pub node_id: String,
    /// The node owner's login name (`tagged-devices` for a tagged node).
    pub login: String,
}

/// The fields read from tailscaled's `apitype.WhoIsResponse` (`Node` is a `tailcfg.Node`,
/// `UserProfile` a `tailcfg.UserProfile`); everything else in the answer is ignored.
#[derive(Deserialize)]
struct WhoIsResponse {
    #[serde(rename = "Node")]
    node: Option<WhoIsNode>,
    #[serde(rename = "UserProfile")]
    user_profile: Option<WhoIsUser>,
}

#[derive(Deserialize)]
struct WhoIsNode {
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "StableID", default)]
    stable_id: String,
    #[serde(rename = "Tags", default)]
    tags: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct WhoIsUser {
    #[serde(rename = "LoginName", default)]
    login_name: String,
}

/// Asks tailscaled who `peer` is. `Ok(None)` when tailscaled does not know the peer.
///
/// # Errors
/// The socket cannot be reached or the answer is not a WhoIs response.
pub async fn whois(socket: &Path, peer: SocketAddr) -> Result<Option<WhoIs>, String> {
    let ask = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("connect {}: {e}", socket.display()))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let request = hyper::Request::get(format!("/localapi/v0/whois?addr={peer}"))
            // The host tailscale's own LocalAPI client sends.
            .header("host", "local-tailscaled.sock")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = send
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), WHOIS_MAX_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    let (status, body) = tokio::time::timeout(WHOIS_TIMEOUT, ask)
        .await
        .map_err(|_| "tailscaled did not answer WhoIs in time".to_owned())??;
    if status == hyper::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !status.is_success() {
        return Err(format!("WhoIs answered {status}"));
    }
    let who: WhoIsResponse =
        serde_json::from_slice(&body).map_err(|e| format!("WhoIs answer: {e}"))?;
    let (node, node_id, tags) = who
        .node
        .map(|n| {
            (
                n.name.trim_end_matches('.').to_owned(),
                n.stable_id,
                n.tags.unwrap_or_default(),
            )
        })
        .unwrap_or_default();
    let login = who.user_profile.map(|u| u.login_name).unwrap_or_default();
    let name = if tags.is_empty() {
        login.clone()
    } else {
        node.clone()
    };
    Ok((!name.is_empty()).then_some(WhoIs {
        name,
        tags,
        node,
        node_id,
        login,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c = Cidr::parse("100.64.0.0/10").unwrap();
        assert!(c.contains("100.100.1.2".parse().unwrap()));
        assert!(!c.contains("100.128.0.1".parse().unwrap()));
        assert!(
            Cidr::parse("127.0.0.1")
                .unwrap()
                .contains("::ffff:127.0.0.1".parse().unwrap())
        );
        let v6 = Cidr::parse("fd7a:115c:a1e0::/48").unwrap();
        assert!(v6.contains("fd7a:115c:a1e0:ab12::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
    }

    /// A stand-in for tailscaled's LocalAPI: answers one WhoIs with `body` (the JSON shape of
    /// tailscale's `apitype.WhoIsResponse`), after checking the request.
    async fn fake_tailscaled(dir: &Path, status: &str, body: &'static str) -> PathBuf {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let path = dir.join("tailscaled.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let status = status.to_owned();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                req.extend_from_slice(&buf[..n]);
            }
            let req = String::from_utf8_lossy(&req);
            assert!(
                req.starts_with("GET /localapi/v0/whois?addr=100.101.102.103:41234 HTTP/1.1"),
                "{req}"
            );
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(reply.as_bytes()).await.unwrap();
        });
        path
    }

    const USER_WHOIS: &str = r#"{"Node":{"ID":123,"StableID":"nStable1CNTRL","Name":"alice-laptop.tail-net.ts.net.","User":42,"Addresses":["100.101.102.103/32"],"Tags":null,"Online":true},"UserProfile":{"ID":42,"LoginName":"alice@example.com","DisplayName":"Alice","ProfilePicURL":""},"CapMap":{"https://tailscale.com/cap/recorder":null}}"#;
    const TAGGED_WHOIS: &str = r#"{"Node":{"ID":7,"StableID":"nStable2CNTRL","Name":"ci-runner.tail-net.ts.net.","User":9,"Tags":["tag:ci","tag:audit"]},"UserProfile":{"ID":9,"LoginName":"tagged-devices","DisplayName":"tagged devices"},"CapMap":{}}"#;

    #[tokio::test]
    async fn whois_names_users_and_tagged_devices() {
        let peer: SocketAddr = "100.101.102.103:41234".parse().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let socket = fake_tailscaled(dir.path(), "200 OK", USER_WHOIS).await;
        let who = whois(&socket, peer).await.unwrap().unwrap();
        assert_eq!(
            who,
            WhoIs {
                name: "alice@example.com".into(),
                tags: vec![],
                node: "alice-laptop.tail-net.ts.net".into(),
                node_id: "nStable1CNTRL".into(),
                login: "alice@example.com".into(),
            }
        );

        let dir = tempfile::tempdir().unwrap();
        let socket = fake_tailscaled(dir.path(), "200 OK", TAGGED_WHOIS).await;
        let who = whois(&socket, peer).await.unwrap().unwrap();
        assert_eq!(who.name, "ci-runner.tail-net.ts.net");
        assert_eq!(who.tags, ["tag:ci", "tag:audit"]);
        assert_eq!(who.node_id, "nStable2CNTRL");

        let dir = tempfile::tempdir().unwrap();
        let socket = fake_tailscaled(dir.path(), "404 Not Found", "no match for IP:port").await;
        assert_eq!(whois(&socket, peer).await.unwrap(), None);

        assert!(whois(&dir.path().join("absent.sock"), peer).await.is_err());
    }

    #[tokio::test]
    async fn whois_logins_get_their_grant() {
        let dir = tempfile::tempdir().unwrap();
        let socket = fake_tailscaled(dir.path(), "200 OK", TAGGED_WHOIS).await;
        let config = AccessConfig {
            whois_socket: Some(socket),
            grants: vec![GrantConfig {
                users: vec!["tag:audit".into()],
                role: Role::Auditor,
                scope: ScopeConfig::default(),
            }],
            ..AccessConfig::default()
        };
        assert!(config.validate().is_empty());
        let access = Access::new(&config, dir.path()).unwrap();
        let who = access
            .authenticate(&HeaderMap::new(), "100.101.102.103:41234".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(
            (who.name.as_str(), who.via, who.role),
            ("ci-runner.tail-net.ts.net", "whois", Role::Auditor)
        );
        assert!(!dir.path().join("admin-token").exists());
    }

    #[test]
    fn config_problems_are_reported() {
        let config = AccessConfig {
            tokens: vec![TokenConfig {
                name: "t".into(),
                sha256: "abc".into(),
                role: Role::Viewer,
                scope: ScopeConfig::default(),
            }],
            proxy: Some(ProxyConfig {
                header: "bad header".into(),
                trusted: vec!["nope".into()],
            }),
            ..AccessConfig::default()
        };
        let problems = config.validate();
        assert_eq!(problems.len(), 4, "{problems:?}");
    }

    #[test]
    fn cookies_and_bearer() {
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=1; castvault_token=abc; b=2".parse().unwrap());
        assert_eq!(cookie(&h, TOKEN_COOKIE).as_deref(), Some("abc"));
        h.insert("authorization", "Bearer xyz".parse().unwrap());
        assert_eq!(bearer(&h).as_deref(), Some("xyz"));
    }
}
