//! Admission and hostile input against the real binary: who may record, a corpus of malformed
//! and abusive requests with the answer each must get, and misbehaving connections alongside
//! good streams. Hostile peers connect from other loopback addresses (127.0.0.2 and up) so
//! per-address limits can be exercised without touching the good streams from 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Node, Used, connect_and_upload, corpus, sha256, start_v2, upload_v1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Longest wait for any one answer in these tests; a healthy node answers in milliseconds.
const ANSWER_WAIT: Duration = Duration::from_secs(20);

/// PROTOCOL.md section 3: an ack frame at least every 5 s even when idle (about every second
/// while data flows); the client gives up after 30 s.
const ACK_MAX_GAP: Duration = Duration::from_secs(5);

fn header(extra: &str) -> String {
    format!(
        "{{\"version\":2,\"width\":80,\"height\":24,\"timestamp\":1700000000,\"sshUser\":\"root\"{extra}}}\n"
    )
}

async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// Writes `request`, then reads until the node closes or `ANSWER_WAIT`; with `half_close` the
/// write side is shut first, like a client that sent everything it had.
async fn exchange(from: IpAddr, to: SocketAddr, request: &[u8], half_close: bool) -> Vec<u8> {
    let mut conn = connect_from(from, to).await;
    let _ = conn.write_all(request).await;
    if half_close {
        let _ = conn.shutdown().await;
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(ANSWER_WAIT, conn.read_to_end(&mut answer)).await;
    answer
}

/// The final status of an HTTP/1.1 answer (after any `100 Continue`), or 0 for none.
fn status(answer: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(answer);
    text.split("\r\n")
        .filter(|l| l.starts_with("HTTP/1."))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u16>().ok())
        .filter(|&s| s != 100)
        .last()
        .unwrap_or(0)
}

fn chunked(path: &str, body: &[u8], extra_headers: &str) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n{extra_headers}\r\n"
    )
    .into_bytes();
    if !body.is_empty() {
        r.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
        r.extend_from_slice(body);
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(b"0\r\n\r\n");
    r
}

fn sized(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn write_config(dir: &Path, text: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("castvault.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

async fn healthy(node: &Node) {
    let (status, _) = common::http_get(node.web, "/healthz").await.unwrap();
    assert_eq!(status, 200, "node unhealthy");
    let (status, _) = common::http_get(node.web, "/readyz").await.unwrap();
    assert_eq!(status, 200, "node not ready");
}

/// A Tailscale-like client is refused with 403 by a recorder that does not admit it, before
/// anything is stored, and records on its next recorder; tokens and tailscaled WhoIs admit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admission_refuses_before_storing_and_the_client_moves_on() {
    let dir = tempfile::tempdir().unwrap();
    let closed_dir = dir.path().join("closed");
    // Only a network the test does not connect from.
    let config = write_config(&closed_dir, "[admission]\nallow_cidrs = [\"10.0.0.0/8\"]\n");
    let closed = Node::start(&closed_dir, &["--config", &config], &[]).await;
    let open = Node::start(&dir.path().join("open"), &[], &[]).await;
    let body = corpus::generate(3, 64 << 10);

    let (addr, used, _) = connect_and_upload(&[closed.ingest, open.ingest], &body, 4096)
        .await
        .expect("the client records on its second recorder");
    assert_eq!((addr, used), (open.ingest, Used::V2));
    let rows = open.wait_finalized(1).await;
    assert_eq!(
        sha256(&open.export(rows[0]["id"].as_str().unwrap())),
        sha256(&body)
    );
    let (_, manifest) = open
        .api(&format!(
            "/api/v1/recordings/{}",
            rows[0]["id"].as_str().unwrap()
        ))
        .await;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(manifest["sender"]["via"], "address");
    assert_eq!(manifest["sender"]["name"], "127.0.0.1");

    // The refusing node answered 403 on both protocols and stored nothing.
    let answer = exchange(
        ip(1),
        closed.ingest,
        &chunked("/record", &body[..1000], ""),
        true,
    )
    .await;
    assert_eq!(status(&answer), 403, "{}", String::from_utf8_lossy(&answer));
    assert!(String::from_utf8_lossy(&answer).contains("not in this recorder's allowed networks"));
    assert!(closed.list().is_empty());
    let spool = std::fs::read_dir(closed_dir.join("spool"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != "journal")
        .count();
    assert_eq!(spool, 0, "a refused sender left spool files");
    let metrics =
        String::from_utf8(common::http_get(closed.web, "/metrics").await.unwrap().1).unwrap();
    assert!(metrics.contains("castvault_ingest_admission_refused_total "));
    assert!(!metrics.contains("castvault_ingest_admission_refused_total 0\n"));

    // Tokens: none or a wrong one is refused; the right one records, named by the token.
    let token = "0123456789abcdef-gateway-token";
    let digest = sha256(token.as_bytes());
    let token_dir = dir.path().join("token");
    let config = write_config(
        &token_dir,
        &format!("[admission]\ntokens = [{{ name = \"gateway-eu\", sha256 = \"{digest}\" }}]\n"),
    );
    let tokens = Node::start(&token_dir, &["--config", &config], &[]).await;
    let small = header("") + "[0.5,\"o\",\"hello\"]\n";
    let without = exchange(
        ip(1),
        tokens.ingest,
        &chunked("/record", small.as_bytes(), ""),
        true,
    )
    .await;
    assert_eq!(status(&without), 403);
    let wrong = exchange(
        ip(1),
        tokens.ingest,
        &chunked(
            "/record",
            small.as_bytes(),
            "Authorization: Bearer nope\r\n",
        ),
        true,
    )
    .await;
    assert_eq!(status(&wrong), 403);
    assert!(String::from_utf8_lossy(&wrong).contains("unknown ingest token"));
    let right = exchange(
        ip(1),
        tokens.ingest,
        &chunked(
            "/record",
            small.as_bytes(),
            &format!("Authorization: Bearer {token}\r\n"),
        ),
        true,
    )
    .await;
    assert_eq!(status(&right), 200, "{}", String::from_utf8_lossy(&right));
    let rows = tokens.wait_finalized(1).await;
    let id = rows[0]["id"].as_str().unwrap();
    let (_, manifest) = tokens.api(&format!("/api/v1/recordings/{id}")).await;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(manifest["sender"]["via"], "token");
    assert_eq!(manifest["sender"]["name"], "gateway-eu");
    // The token never appears in what the node prints or serves.
    let metrics = common::http_get(tokens.web, "/metrics").await.unwrap().1;
    assert!(!String::from_utf8_lossy(&metrics).contains(token));
    let check = std::process::Command::new(common::BIN)
        .args(["config", "check", "--config", &config])
        .output()
        .unwrap();
    assert!(check.status.success());
    assert!(!String::from_utf8_lossy(&check.stdout).contains(&digest));

    // tailscaled WhoIs: a node with an allowed tag records, with its identity stored; one
    // without is refused; tailscaled gone means 503 (try the next recorder).
    let whois_dir = dir.path().join("whois");
    let socket = whois_dir.join("tailscaled.sock");
    std::fs::create_dir_all(&whois_dir).unwrap();
    let answers = fake_tailscaled(&socket);
    let config = write_config(
        &whois_dir,
        &format!(
            "[admission]\nwhois_socket = {:?}\nallow_tags = [\"tag:ssh-prod\"]\n",
            socket.display().to_string()
        ),
    );
    let whois = Node::start(&whois_dir, &["--config", &config], &[]).await;
    answers
        .lock()
        .unwrap()
        .clone_from(&Some(ALLOWED_WHOIS.to_owned()));
    let status_v1 = upload_v1(whois.ingest, &[small.as_bytes()]).await.unwrap();
    assert_eq!(status_v1, 200);
    let rows = whois.wait_finalized(1).await;
    let id = rows[0]["id"].as_str().unwrap();
    let (_, manifest) = whois.api(&format!("/api/v1/recordings/{id}")).await;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(
        manifest["sender"],
        serde_json::json!({"via": "whois", "name": "db-prod.tail-net.ts.net", "node_id": "nProdStable1CNTRL", "tags": ["tag:ssh-prod"], "user": "tagged-devices"})
    );
    // A Kubernetes event gets the uploader as its destination.
    let event = exchange(
        ip(1),
        whois.ingest,
        &sized(
            "POST",
            "/v2/event",
            br#"{"type":"request","request":{"method":"GET"}}"#,
        ),
        true,
    )
    .await;
    assert_eq!(status(&event), 200, "{}", String::from_utf8_lossy(&event));
    answers
        .lock()
        .unwrap()
        .clone_from(&Some(OTHER_WHOIS.to_owned()));
    let refused = exchange(
        ip(1),
        whois.ingest,
        &chunked("/record", small.as_bytes(), ""),
        true,
    )
    .await;
    assert_eq!(status(&refused), 403);
    assert!(String::from_utf8_lossy(&refused).contains("laptop.tail-net.ts.net"));
    answers.lock().unwrap().take();
    let unknown = exchange(
        ip(1),
        whois.ingest,
        &chunked("/record", small.as_bytes(), ""),
        true,
    )
    .await;
    assert_eq!(status(&unknown), 403);
    std::fs::remove_file(&socket).unwrap();
    let down = exchange(
        ip(1),
        whois.ingest,
        &chunked("/record", small.as_bytes(), ""),
        true,
    )
    .await;
    assert_eq!(status(&down), 503);
    assert_eq!(whois.list().len(), 1);
}

/// tailscaled's WhoIs answers (tailscale `apitype.WhoIsResponse`: `Node` a `tailcfg.Node`,
/// `UserProfile` a `tailcfg.UserProfile`, `CapMap`), trimmed to fields real answers carry.
const ALLOWED_WHOIS: &str = r#"{"Node":{"ID":8123,"StableID":"nProdStable1CNTRL","Name":"db-prod.tail-net.ts.net.","User":9,"Key":"nodekey:0a1b","Addresses":["100.101.1.2/32","fd7a:115c:a1e0::1/128"],"Tags":["tag:ssh-prod"],"Online":true,"Hostinfo":{"OS":"linux","Hostname":"db-prod"}},"UserProfile":{"ID":9,"LoginName":"tagged-devices","DisplayName":"tagged devices","ProfilePicURL":""},"CapMap":{"https://tailscale.com/cap/ssh":null}}"#;
const OTHER_WHOIS: &str = r#"{"Node":{"ID":77,"StableID":"nLaptopCNTRL","Name":"laptop.tail-net.ts.net.","User":42,"Addresses":["100.101.1.9/32"],"Tags":null},"UserProfile":{"ID":42,"LoginName":"alice@example.com","DisplayName":"Alice"},"CapMap":{}}"#;

/// A stand-in for tailscaled's LocalAPI on a unix socket: answers each
/// `GET /localapi/v0/whois?addr=IP:PORT` with the current answer, or 404 when there is none.
fn fake_tailscaled(path: &Path) -> std::sync::Arc<std::sync::Mutex<Option<String>>> {
    let answer = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    let current = answer.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let current = current.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&req);
                assert!(
                    text.starts_with("GET /localapi/v0/whois?addr=127.0.0.1:"),
                    "{text}"
                );
                let answer = current.lock().unwrap().clone();
                let reply = match answer {
                    Some(body) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    ),
                    None => {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 21\r\n\r\nno match for IP:port\n"
                            .to_owned()
                    }
                };
                let _ = conn.write_all(reply.as_bytes()).await;
            });
        }
    });
    answer
}
