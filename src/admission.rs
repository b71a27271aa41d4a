//! Who may send recordings, and how much any one sender may use.
//!
//! **Admission** runs on every ingest request before its body is read; a refusal is a 403 (or a
//! 503 when tailscaled cannot be asked), so a Tailscale client tries its next recorder.
//! - The peer's address must be in `allow_cidrs` (default: loopback and Tailscale's ranges
//!   `100.64.0.0/10` and `fd7a:115c:a1e0::/48`).
//! - When `whois_socket` or `tokens` are configured, the peer must also prove who it is: a
//!   bearer token whose SHA-256 is listed, or tailscaled's WhoIs naming a node that carries one
//!   of `allow_tags` or is named in `allow_nodes`. Tailscale clients send no credentials, so
//!   they are admitted by WhoIs; the SSH gateway and other senders use tokens.
//! - With neither configured, the address alone admits.
//!
//! The identity found is stored with the recording ([`Sender`]) and fills in a Kubernetes
//! event's `destination`, as tsrecorder does with `dstNode` and `dstNodeID`.
//!
//! **Limits** ([`LimitsConfig`]) bound what one peer can take: connections, open recordings,
//! the header line's size and arrival time, HTTP/2 streams and header lists, `/v2/event`
//! requests per second, and events per second per recording (throttled by reading more slowly,
//! never dropped). A peer over a limit gets a 429 or an error frame naming it; other peers do not
//! notice.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use castvault_storage::manifest::Sender;
use serde::Deserialize;

use crate::auth::{self, Cidr};

/// Tailscale's IPv4 CGNAT range and IPv6 ULA range, and loopback for local senders.
pub const DEFAULT_ALLOW_CIDRS: [&str; 4] = [
    "127.0.0.0/8",
    "::1/128",
    "100.64.0.0/10",
    "fd7a:115c:a1e0::/48",
];

/// An ingest token as configured: only its SHA-256 is kept (`castvault token new` prints both).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestToken {
    /// Stored as the recording's sender name.
    pub name: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
}

/// `[admission]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// Networks senders may connect from.
    pub allow_cidrs: Vec<String>,
    /// tailscaled's LocalAPI socket, e.g. `/var/run/tailscale/tailscaled.sock`.
    pub whois_socket: Option<PathBuf>,
    /// WhoIs admits a node carrying any of these tags (`tag:…`).
    pub allow_tags: Vec<String>,
    /// WhoIs admits these nodes by MagicDNS name (`host.tailnet.ts.net`).
    pub allow_nodes: Vec<String>,
    pub tokens: Vec<IngestToken>,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            allow_cidrs: DEFAULT_ALLOW_CIDRS.iter().map(|&c| c.to_owned()).collect(),
            whois_socket: None,
            allow_tags: Vec::new(),
            allow_nodes: Vec::new(),
            tokens: Vec::new(),
        }
    }
}

impl AdmissionConfig {
    /// Problems for `config check` (token digests are never echoed).
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for cidr in &self.allow_cidrs {
            if Cidr::parse(cidr).is_none() {
                problems.push(format!("admission.allow_cidrs: {cidr:?} is not a CIDR"));
            }
        }
        for t in &self.tokens {
            if t.sha256.len() != 64 || hex::decode(&t.sha256).is_err() {
                problems.push(format!(
                    "admission.tokens {:?}: sha256 must be 64 hex digits (the token's SHA-256)",
                    t.name
                ));
            }
        }
        if self.whois_socket.is_some() && self.allow_tags.is_empty() && self.allow_nodes.is_empty()
        {
            problems.push(
                "admission.whois_socket: set allow_tags or allow_nodes, or no node is admitted"
                    .to_owned(),
            );
        }
        if self.whois_socket.is_none()
            && !(self.allow_tags.is_empty() && self.allow_nodes.is_empty())
        {
            problems.push("admission.allow_tags and allow_nodes need whois_socket".to_owned());
        }
        problems
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 403: the sender is not allowed.
    Forbidden(String),
    /// 503: the sender could not be identified now (tailscaled unreachable).
    Unavailable(String),
}

/// Admission rules, built from [`AdmissionConfig`].
pub struct Admission {
    cidrs: Vec<Cidr>,
    whois_socket: Option<PathBuf>,
    allow_tags: Vec<String>,
    allow_nodes: Vec<String>,
    tokens: Vec<(String, [u8; 32])>,
}

impl Admission {
    pub fn new(config: &AdmissionConfig) -> Self {
        Self {
            cidrs: config
                .allow_cidrs
                .iter()
                .filter_map(|c| Cidr::parse(c))
                .collect(),
            whois_socket: config.whois_socket.clone(),
            allow_tags: config.allow_tags.clone(),
            allow_nodes: config
                .allow_nodes
                .iter()
                .map(|n| n.trim_end_matches('.').to_owned())
                .collect(),
            tokens: config
                .tokens
                .iter()
                .filter_map(|t| {
                    let digest: [u8; 32] = hex::decode(&t.sha256).ok()?.try_into().ok()?;
                    Some((t.name.clone(), digest))
                })
                .collect(),
        }
    }

    /// Decides whether `peer` may send, from its address and request headers.
    ///
    /// # Errors
    /// The [`Refusal`], with a message for the sender.
    pub async fn admit(&self, headers: &HeaderMap, peer: SocketAddr) -> Result<Sender, Refusal> {
        if !self.cidrs.iter().any(|c| c.contains(peer.ip())) {
            return Err(Refusal::Forbidden(format!(
                "{} is not in this recorder's allowed networks",
                peer.ip()
            )));
        }
        if let Some(token) = auth::bearer(headers) {
            let digest = auth::sha256(&token);
            return match self.tokens.iter().find(|(_, d)| auth::same(d, &digest)) {
                Some((name, _)) => Ok(Sender {
                    via: "token".to_owned(),
                    name: name.clone(),
                    node_id: None,
                    tags: Vec::new(),
                    user: None,
                }),
                None => Err(Refusal::Forbidden("unknown ingest token".to_owned())),
            };
        }
        let Some(socket) = &self.whois_socket else {
            if self.tokens.is_empty() {
                return Ok(Sender {
                    via: "address".to_owned(),
                    name: peer.ip().to_string(),
                    node_id: None,
                    tags: Vec::new(),
                    user: None,
                });
            }
            return Err(Refusal::Forbidden(
                "this recorder needs an ingest token (Authorization: Bearer)".to_owned(),
            ));
        };
        let who = match auth::whois(socket, peer).await {
            Ok(Some(who)) => who,
            Ok(None) => {
                return Err(Refusal::Forbidden(format!(
                    "{} is not a known tailnet node",
                    peer.ip()
                )));
            }
            Err(e) => {
                tracing::warn!(error = %e, "tailscaled WhoIs failed; refusing the sender");
                return Err(Refusal::Unavailable(
                    "recorder cannot identify senders right now; try the next recorder".to_owned(),
                ));
            }
        };
        let allowed = who.tags.iter().any(|t| self.allow_tags.contains(t))
            || self.allow_nodes.contains(&who.node);
        if !allowed {
            return Err(Refusal::Forbidden(format!(
                "node {:?} may not send recordings to this recorder",
                who.node
            )));
        }
        Ok(Sender {
            via: "whois".to_owned(),
            name: who.node,
            node_id: Some(who.node_id).filter(|id| !id.is_empty()),
            tags: who.tags,
            user: Some(who.login).filter(|l| !l.is_empty()),
        })
    }
}

/// `[limits]`: what one peer, and everyone together, may take from the ingest listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Open connections on the ingest listener; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Open connections from one address; more are answered 429 and closed.
    pub max_connections_per_peer: usize,
    /// Recordings open at once from one address; more are refused with 429.
    pub max_recordings_per_peer: usize,
    /// Longest asciicast header line.
    pub max_header_bytes: usize,
    /// Time allowed from the request to the end of the header line; then the stream is refused.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time allowed for an HTTP/1.1 request's headers to arrive.
    #[serde(with = "humantime_serde")]
    pub http_header_timeout: Duration,
    /// HTTP/2 streams open at once on one connection.
    pub h2_max_concurrent_streams: u32,
    /// Largest HTTP/2 header list (decoded), and HTTP/1.1 read buffer.
    pub max_request_header_bytes: u32,
    /// HTTP/2 streams a client may reset before the server accepts them (rapid reset,
    /// CVE-2023-44487); past it the connection is closed.
    pub h2_max_pending_reset_streams: usize,
    /// `/v2/event` requests per second from one address (a burst of as many is allowed).
    pub events_per_second_per_peer: u32,
    /// asciicast events (lines) per second per recording before reading slows down; a burst of
    /// `stream_event_burst` is allowed. Nothing is dropped: the sender is pushed back on.
    pub stream_events_per_second: u32,
    pub stream_event_burst: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: crate::listener::MAX_CONNECTIONS,
            // A Tailscale SSH server opens one or two connections per session; a busy bastion
            // may run hundreds of sessions at once.
            max_connections_per_peer: 2048,
            max_recordings_per_peer: 2048,
            max_header_bytes: 64 << 10,
            // The client writes the header as soon as it has the response headers.
            header_timeout: Duration::from_secs(30),
            http_header_timeout: Duration::from_secs(10),
            // Real clients use one or two streams per connection; load generators multiplex.
            h2_max_concurrent_streams: 1024,
            max_request_header_bytes: 16 << 10,
            h2_max_pending_reset_streams: 20,
            events_per_second_per_peer: 200,
            // A terminal flooded with output arrives in pty reads of up to 4 KiB: `cat` of a
            // large file at 300 MB/s is about 75,000 events per second, and mixed output
            // (logs, prompts, colour) at the benchmark corpus's 350 bytes per event and
            // 100 MB/s is 300,000. This bounds the per-event work (line scan, indexer) one
            // stream can cause, while only a flood of tiny events far above real output is
            // slowed. (20,000 once held an upload of the benchmark corpus to 10 MB/s.)
            stream_events_per_second: 200_000,
            stream_event_burst: 400_000,
        }
    }
}

impl LimitsConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let positive: [(&str, u64); 8] = [
            ("limits.max_connections", self.max_connections as u64),
            (
                "limits.max_connections_per_peer",
                self.max_connections_per_peer as u64,
            ),
            (
                "limits.max_recordings_per_peer",
                self.max_recordings_per_peer as u64,
            ),
            (
                "limits.h2_max_concurrent_streams",
                u64::from(self.h2_max_concurrent_streams),
            ),
            (
                "limits.events_per_second_per_peer",
                u64::from(self.events_per_second_per_peer),
            ),
            (
                "limits.stream_events_per_second",
                u64::from(self.stream_events_per_second),
            ),
            (
                "limits.stream_event_burst",
                u64::from(self.stream_event_burst),
            ),
            (
                "limits.max_request_header_bytes",
                u64::from(self.max_request_header_bytes),
            ),
        ];
        for (name, value) in positive {
            if value == 0 {
                problems.push(format!("{name} must be at least 1"));
            }
        }
        if !(1 << 10..=1 << 20).contains(&self.max_header_bytes) {
            problems.push("limits.max_header_bytes must be between 1 KiB and 1 MiB".to_owned());
        }
        if self.max_request_header_bytes < 8 << 10 {
            problems.push("limits.max_request_header_bytes must be at least 8 KiB".to_owned());
        }
        if self.header_timeout < Duration::from_secs(1)
            || self.http_header_timeout < Duration::from_secs(1)
        {
            problems.push(
                "limits.header_timeout and http_header_timeout must be at least 1s".to_owned(),
            );
        }
        problems
    }
}

/// Counts what each address holds open (connections or recordings); a slot is released when
/// its [`PeerSlot`] drops. Entries exist only while an address holds a slot, so the map is
/// bounded by the slots themselves.
#[derive(Clone)]
pub struct PeerCounts {
    max: usize,
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One held slot.
pub struct PeerSlot {
    ip: IpAddr,
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PeerCounts {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            held: Arc::default(),
        }
    }

    /// A slot for `ip`, or `None` when it already holds the maximum.
    pub fn take(&self, ip: IpAddr) -> Option<PeerSlot> {
        let ip = canonical(ip);
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = held.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            ip,
            held: self.held.clone(),
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// IPv4-mapped IPv6 addresses count as their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A token bucket: `rate` per second, up to `burst` saved.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn new(rate: u32, burst: u32) -> Self {
        Self::fractional(f64::from(rate.max(1)), f64::from(burst.max(1)))
    }

    /// `rate` per second (may be below one), up to `burst` saved.
    pub fn fractional(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
    }

    /// Takes `n` tokens, going into debt if need be; returns how long to wait until the debt
    /// is paid (zero when there was enough).
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// Addresses whose request rate is tracked at once; past it, addresses whose buckets are full
/// (idle) are forgotten, and if none are, the newcomer is refused until some are.
const MAX_RATE_PEERS: usize = 65_536;

/// Requests per second per address.
pub struct PeerRate {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl PeerRate {
    /// `rate` requests per second, a burst of as many.
    pub fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            burst: rate,
            buckets: Mutex::default(),
        }
    }

    /// `n` requests per minute, a burst of as many.
    pub fn per_minute(n: u32) -> Self {
        let n = f64::from(n.max(1));
        Self {
            rate: n / 60.0,
            burst: n,
            buckets: Mutex::default(),
        }
    }

    /// True when `ip` may make one more request now.
    pub fn allow(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_RATE_PEERS && !buckets.contains_key(&ip) {
            buckets.retain(|_, b| !b.full(now));
            if buckets.len() >= MAX_RATE_PEERS {
                return false;
            }
        }
        buckets
            .entry(ip)
            .or_insert_with(|| Bucket::fractional(self.rate, self.burst))
            .try_take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_counts_release_on_drop() {
        let counts = PeerCounts::new(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = counts.take(ip).unwrap();
        let _b = counts.take("::ffff:10.0.0.1".parse().unwrap()).unwrap();
        assert!(counts.take(ip).is_none());
        assert!(counts.take("10.0.0.2".parse().unwrap()).is_some());
        drop(a);
        assert!(counts.take(ip).is_some());
    }

    #[test]
    fn bucket_goes_into_debt_and_refills() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, 10);
        assert_eq!(b.take(10, t0), Duration::ZERO);
        assert_eq!(b.take(10, t0), Duration::from_millis(100));
        // 150 ms later the debt (10) is paid and 5 tokens are back.
        assert_eq!(b.take(5, t0 + Duration::from_millis(150)), Duration::ZERO);
        assert!(!b.try_take(t0 + Duration::from_millis(150)));
    }

    #[test]
    fn peer_rate_is_per_address() {
        let rate = PeerRate::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(rate.allow(a) && rate.allow(a));
        assert!(!rate.allow(a));
        assert!(rate.allow("10.0.0.2".parse().unwrap()));
    }

    #[tokio::test]
    async fn addresses_and_tokens() {
        let (token, digest) = auth::new_token();
        let open = Admission::new(&AdmissionConfig::default());
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let outside: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let sender = open.admit(&HeaderMap::new(), local).await.unwrap();
        assert_eq!(
            (sender.via.as_str(), sender.name.as_str()),
            ("address", "127.0.0.1")
        );
        assert!(matches!(
            open.admit(&HeaderMap::new(), outside).await,
            Err(Refusal::Forbidden(_))
        ));

        let tokens = Admission::new(&AdmissionConfig {
            tokens: vec![IngestToken {
                name: "gateway-eu".into(),
                sha256: digest,
            }],
            ..AdmissionConfig::default()
        });
        let mut headers = HeaderMap::new();
        assert!(tokens.admit(&headers, local).await.is_err());
        headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
        assert_eq!(
            tokens.admit(&headers, local).await.unwrap().name,
            "gateway-eu"
        );
        headers.insert("authorization", "Bearer wrong".parse().unwrap());
        assert!(tokens.admit(&headers, local).await.is_err());
        // The address gate comes first, token or not.
        assert!(tokens.admit(&headers, outside).await.is_err());
    }
}
