//! Admission and hostile input against the real binary: who may record, a corpus of malformed
//! and abusive requests with the answer each must get, and misbehaving connections alongside
//! good streams. Hostile peers connect from other loopback addresses (127.0.0.2 and up) so
//! per-address limits can be exercised without touching the good streams from 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Node, Used, connect_and_upload, corpus, sha256, start_v2, start_v2_from, upload_v1};
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

/// A v1 recording `body` from 127.0.0.1 with extra request `headers`; the whole answer.
async fn record_v1(to: SocketAddr, body: &[u8], headers: &str) -> Vec<u8> {
    exchange(ip(1), to, &chunked("/record", body, headers), true).await
}

/// `castvault config check --config PATH`.
fn config_check(path: &str) -> std::process::Output {
    std::process::Command::new(common::BIN)
        .args(["config", "check", "--config", path])
        .output()
        .unwrap()
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
    let answer = record_v1(closed.ingest, &body[..1000], "").await;
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
    let without = record_v1(tokens.ingest, small.as_bytes(), "").await;
    assert_eq!(status(&without), 403);
    let wrong = record_v1(
        tokens.ingest,
        small.as_bytes(),
        "Authorization: Bearer nope\r\n",
    )
    .await;
    assert_eq!(status(&wrong), 403);
    assert!(String::from_utf8_lossy(&wrong).contains("unknown ingest token"));
    let right = record_v1(
        tokens.ingest,
        small.as_bytes(),
        &format!("Authorization: Bearer {token}\r\n"),
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
    let check = config_check(&config);
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
    let refused = record_v1(whois.ingest, small.as_bytes(), "").await;
    assert_eq!(status(&refused), 403);
    assert!(String::from_utf8_lossy(&refused).contains("laptop.tail-net.ts.net"));
    answers.lock().unwrap().take();
    let unknown = record_v1(whois.ingest, small.as_bytes(), "").await;
    assert_eq!(status(&unknown), 403);
    std::fs::remove_file(&socket).unwrap();
    let down = record_v1(whois.ingest, small.as_bytes(), "").await;
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

/// What a hostile request must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// This final HTTP status.
    Status(u16),
    /// No HTTP answer: the node closes the connection (for bytes that are not HTTP at all).
    Closed,
}

struct Case {
    name: &'static str,
    to_web: bool,
    request: Vec<u8>,
    expect: Expect,
    /// Text the answer must contain (the clear error).
    says: &'static str,
}

fn case(
    name: &'static str,
    request: impl Into<Vec<u8>>,
    expect: Expect,
    says: &'static str,
) -> Case {
    Case {
        name,
        to_web: false,
        request: request.into(),
        expect,
        says,
    }
}

fn web_case(name: &'static str, path: &str, token: &str, expect: Expect) -> Case {
    Case {
        name,
        to_web: true,
        request: format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .into_bytes(),
        expect,
        says: "",
    }
}

/// The corpus of hostile and malformed requests, each with its expected answer.
fn corpus_cases(token: &str) -> Vec<Case> {
    use Expect::Status;
    let good_header = header("");
    let long_line = format!("{good_header}[0.1,\"o\",\"{}\"]\n", "x".repeat(80 << 10));
    let bomb = "[".repeat(100_000) + "\n";
    let event_bomb = "[".repeat(100_000);
    let mut cases = vec![
        case(
            "GET /record",
            "GET /record HTTP/1.1\r\nHost: x\r\n\r\n",
            Status(405),
            "",
        ),
        case(
            "PUT /v2/record",
            "PUT /v2/record HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            Status(405),
            "",
        ),
        case(
            "DELETE /v2/event",
            "DELETE /v2/event HTTP/1.1\r\nHost: x\r\n\r\n",
            Status(405),
            "",
        ),
        case(
            "GET /",
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            Status(404),
            "not a recorder endpoint",
        ),
        case(
            "traversal in the path",
            "GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
            Status(404),
            "not a recorder endpoint",
        ),
        case(
            "encoded traversal",
            "POST /%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            Status(404),
            "",
        ),
        case(
            "traversal after /record",
            "POST /record/../../x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            Status(404),
            "",
        ),
        case(
            "invalid UTF-8 in the path",
            b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            Status(400),
            "",
        ),
        case(
            "v2 over HTTP/1.1",
            sized("POST", "/v2/record", good_header.as_bytes()),
            Status(505),
            "needs HTTP/2",
        ),
        case(
            "unknown HTTP version",
            "GET /record HTTP/9.9\r\nHost: x\r\n\r\n",
            Status(400),
            "",
        ),
        case(
            "not HTTP (a TLS hello)",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage".to_vec(),
            Status(400),
            "",
        ),
        case(
            "endless request line",
            format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100 << 10)),
            Status(431),
            "",
        ),
        case(
            "giant header field",
            format!(
                "POST /record HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "b".repeat(40 << 10)
            ),
            Status(431),
            "",
        ),
        case(
            "NUL in a header value",
            b"POST /record HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n"
                .to_vec(),
            Status(400),
            "",
        ),
        case(
            "space in a header name",
            "POST /record HTTP/1.1\r\nHost: x\r\nBad Name: v\r\nContent-Length: 0\r\n\r\n",
            Status(400),
            "",
        ),
        case(
            "Content-Length and chunked (smuggling)",
            format!(
                "POST /record HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{good_header}\r\n0\r\n\r\n",
                good_header.len()
            ),
            // RFC 9112 6.3: chunked wins, and the connection closes after the answer, so
            // nothing can be smuggled behind it.
            Status(200),
            "connection: close",
        ),
        case(
            "two different Content-Lengths",
            "POST /record HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
            Status(400),
            "",
        ),
        case(
            "negative Content-Length",
            "POST /record HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            Status(400),
            "",
        ),
        case(
            "unsupported Transfer-Encoding",
            "POST /record HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
            Status(400),
            "",
        ),
        case(
            "empty body",
            chunked("/record", b"", ""),
            Status(400),
            "expected an asciicast v2 header",
        ),
        case(
            "header is not JSON",
            chunked("/record", b"hello world\n", ""),
            Status(400),
            "invalid asciicast header",
        ),
        case(
            "header is asciicast v1",
            chunked(
                "/record",
                b"{\"version\":1,\"width\":80,\"height\":24}\n",
                "",
            ),
            Status(400),
            "invalid asciicast header",
        ),
        case(
            "header with invalid UTF-8",
            chunked(
                "/record",
                b"{\"version\":2,\"width\":80,\"height\":24,\"x\":\"\xff\xfe\"}\n",
                "",
            ),
            Status(400),
            "invalid asciicast header",
        ),
        case(
            "header of NUL bytes",
            chunked("/record", b"\x00\x00\x00\x00\n", ""),
            Status(400),
            "invalid asciicast header",
        ),
        case(
            "JSON bomb header",
            chunked("/record", bomb.as_bytes(), ""),
            Status(400),
            "expected an asciicast v2 header",
        ),
        case(
            "header line without end",
            chunked(
                "/record",
                "{\"version\":2,\"pad\":\"".repeat(5000).as_bytes(),
                "",
            ),
            Status(400),
            "first line is longer than",
        ),
        case(
            "header number out of range",
            chunked(
                "/record",
                b"{\"version\":2,\"width\":1e999,\"height\":24}\n",
                "",
            ),
            Status(400),
            "invalid asciicast header",
        ),
        case(
            "event line over the line limit",
            chunked("/record", long_line.as_bytes(), ""),
            Status(503),
            "a line is longer than the limit",
        ),
        case(
            "invalid chunk size",
            format!(
                "POST /record HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{good_header}\r\n0\r\n\r\n"
            ),
            Status(400),
            "",
        ),
        case(
            "chunk size overflow",
            "POST /record HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nabc\r\n",
            Status(400),
            "upload stream broke",
        ),
        case(
            "event: not JSON",
            sized("POST", "/v2/event", b"not json"),
            Status(400),
            "one JSON object",
        ),
        case(
            "event: a JSON array",
            sized("POST", "/v2/event", b"[1,2,3]"),
            Status(400),
            "one JSON object",
        ),
        case(
            "event: JSON bomb",
            sized("POST", "/v2/event", event_bomb.as_bytes()),
            Status(400),
            "one JSON object",
        ),
        case(
            "event: invalid UTF-8",
            sized("POST", "/v2/event", b"{\"a\":\"\xff\"}"),
            Status(400),
            "one JSON object",
        ),
        case(
            "event: over 16 MiB",
            sized("POST", "/v2/event", &vec![b' '; (16 << 20) + 1]),
            Status(413),
            "",
        ),
    ];
    // Traversal and junk in every id and path parameter of the web API.
    for (name, path, expect) in [
        (
            "api: traversal id",
            "/api/v1/recordings/..%2F..%2Fetc%2Fpasswd",
            Status(400),
        ),
        (
            "api: traversal in cast",
            "/api/v1/recordings/..%2F..%2Fv1%2Fkeys/cast",
            Status(400),
        ),
        (
            "api: traversal in bundle",
            "/api/v1/recordings/01a22dda358d4a2375e59e35fff3-local%2F..%2F..%2Fx/bundle",
            Status(400),
        ),
        (
            "api: NUL in id",
            "/api/v1/recordings/%00/window?from=0",
            Status(400),
        ),
        (
            "api: unknown region id",
            "/api/v1/recordings/01a22dda358d4a2375e59e35fff3-mars/cast",
            Status(404),
        ),
        (
            "api: well-formed unknown id",
            "/api/v1/recordings/01a22dda358d4a2375e59e35fff3-local",
            Status(404),
        ),
        (
            "api: live of unknown id",
            "/api/v1/recordings/01a22dda358d4a2375e59e35fff3-local/live",
            Status(404),
        ),
        (
            "api: dotted segments",
            "/api/v1/recordings/../../../../etc/passwd",
            Status(404),
        ),
        (
            "api: window of an unknown id, NaN offset",
            "/api/v1/recordings/01a22dda358d4a2375e59e35fff3-local/window?from=NaN",
            Status(404),
        ),
        (
            "api: export bad time",
            "/api/v1/export?from=..%2F..%2F",
            Status(400),
        ),
        (
            "api: list bad sort",
            "/api/v1/recordings?sort=%3BDROP%20TABLE",
            Status(400),
        ),
    ] {
        cases.push(web_case(name, path, token, expect));
    }
    cases
}

/// At least 40 hostile or malformed requests against one node, each with its expected answer,
/// while a good v2 stream records: the node stays healthy and the stream is byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_corpus_gets_clear_answers_and_harms_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "max_line_bytes = 65536\n[limits]\nheader_timeout = \"2s\"\nhttp_header_timeout = \"2s\"\nevents_per_second_per_peer = 20\nmax_connections_per_peer = 16\nmax_recordings_per_peer = 4\n",
    );
    let node = Node::start(dir.path(), &["--config", &config], &[]).await;
    let token = node.admin_token();

    // The good stream runs through the whole corpus.
    let body = corpus::generate(11, 256 << 10);
    let mut good = start_v2(node.ingest).await.unwrap();
    let pieces: Vec<Vec<u8>> = body.chunks(2048).map(<[u8]>::to_vec).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let sender = tokio::spawn(async move {
        for piece in pieces {
            good.send(&piece).await.unwrap();
            if !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        good
    });

    let cases = corpus_cases(&token);
    let mut count = 0;
    let mut wrong = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let to = if c.to_web { node.web } else { node.ingest };
        let answer = exchange(ip(2), to, &c.request, true).await;
        let text = String::from_utf8_lossy(&answer);
        let got = match status(&answer) {
            0 => Expect::Closed,
            s => Expect::Status(s),
        };
        if got != c.expect || !text.contains(c.says) {
            wrong.push(format!(
                "{}: expected {:?} saying {:?}, got: {}",
                c.name,
                c.expect,
                c.says,
                text.chars().take(300).collect::<String>()
            ));
        }
        count += 1;
        if i % 10 == 9 {
            healthy(&node).await;
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // Stateful abuse, each from its own address.
    // Slow body: a byte every 50 ms for a short while still records exactly.
    let slow = header("") + "[0.5,\"o\",\"slow\"]\n";
    let mut conn = connect_from(ip(3), node.ingest).await;
    conn.write_all(b"POST /record HTTP/1.1\r\nHost: x\r\nContent-Length: ")
        .await
        .unwrap();
    conn.write_all(format!("{}\r\n\r\n", slow.len()).as_bytes())
        .await
        .unwrap();
    for b in slow.as_bytes().chunks(8) {
        conn.write_all(b).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut answer = vec![0; 12];
    tokio::time::timeout(ANSWER_WAIT, conn.read_exact(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200", "slow body");
    count += 1;

    // Slow request headers (slowloris): cut off at the header time limit with 408.
    let mut conn = connect_from(ip(3), node.ingest).await;
    conn.write_all(b"POST /record HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut closed = false;
    while started.elapsed() < ANSWER_WAIT {
        if conn.write_all(b"X-Drip: a\r\n").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(300), conn.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    assert!(
        closed || status(&answer) == 408,
        "slow headers were never cut off"
    );
    count += 1;

    // Half-open: a connection that sends nothing is closed at the header time limit.
    let mut conn = connect_from(ip(3), node.ingest).await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(ANSWER_WAIT, conn.read(&mut buf)).await;
    assert!(
        matches!(n, Ok(Ok(_) | Err(_))),
        "an idle connection was never closed"
    );
    count += 1;

    // The header line never arrives after the request (v1, body kept open): 408.
    let mut conn = connect_from(ip(3), node.ingest).await;
    conn.write_all(
        b"POST /record HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"ver\r\n",
    )
    .await
    .unwrap();
    let mut answer = vec![0; 12];
    tokio::time::timeout(ANSWER_WAIT, conn.read_exact(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&answer, b"HTTP/1.1 408", "header never arrives");
    count += 1;

    // The same over v2: the ack stream ends with an error frame naming the time limit.
    let stalled = start_v2(node.ingest).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = stalled.log.lock().unwrap().clone();
    assert!(
        log.error
            .as_deref()
            .is_some_and(|e| e.contains("no asciicast header line")),
        "{log:?}"
    );
    drop(stalled);
    count += 1;

    // A reset stream: headers and part of a recording, then RST_STREAM.
    let mut reset = start_v2(node.ingest).await.unwrap();
    reset.send(header("").as_bytes()).await.unwrap();
    reset.send(b"[0.1,\"o\",\"cut").await.unwrap();
    drop(reset);
    count += 1;

    // HTTP/2 rapid reset: streams opened and reset at once; the connection is closed with
    // GOAWAY ENHANCE_YOUR_CALM.
    assert_eq!(
        rapid_reset(ip(4), node.ingest, 500).await,
        Some(0xb),
        "rapid reset"
    );
    count += 1;

    // /v2/event flood from one address: 429 past the per-address rate.
    let mut statuses = Vec::new();
    for _ in 0..40 {
        let answer = exchange(
            ip(5),
            node.ingest,
            &sized("POST", "/v2/event", br#"{"type":"request"}"#),
            true,
        )
        .await;
        statuses.push(status(&answer));
    }
    assert!(statuses[..20].iter().all(|&s| s == 200), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    // Another address is not affected.
    let other = exchange(
        ip(6),
        node.ingest,
        &sized("POST", "/v2/event", br#"{"type":"request"}"#),
        true,
    )
    .await;
    assert_eq!(status(&other), 200);
    count += 1;

    // Open recordings per address: the fifth from one address gets 429.
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut conn = connect_from(ip(7), node.ingest).await;
        conn.write_all(format!("POST /record HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n", header("").len(), header("")).as_bytes()).await.unwrap();
        open.push(conn);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fifth = exchange(
        ip(7),
        node.ingest,
        &chunked("/record", header("").as_bytes(), ""),
        true,
    )
    .await;
    assert_eq!(status(&fifth), 429, "{}", String::from_utf8_lossy(&fifth));
    assert!(String::from_utf8_lossy(&fifth).contains("too many open recordings"));
    drop(open);
    count += 1;

    // Connections per address: past the limit, 429 and closed.
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(connect_from(ip(8), node.ingest).await);
    }
    let over = exchange(
        ip(8),
        node.ingest,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        true,
    )
    .await;
    assert_eq!(status(&over), 429, "{}", String::from_utf8_lossy(&over));
    assert!(String::from_utf8_lossy(&over).contains("too many connections"));
    drop(held);
    count += 1;

    assert!(count >= 40, "only {count} hostile cases");

    // The good stream went on undisturbed: byte-exact, and never a late ack.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let good = sender.await.unwrap();
    let (result, log) = good.finish().await;
    result.unwrap();
    let gap = log
        .acks
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap_or_default();
    assert!(gap <= ACK_MAX_GAP, "ack gap {gap:?}");
    healthy(&node).await;
    let deadline = Instant::now() + ANSWER_WAIT;
    let good_row = loop {
        let rows = node.list();
        let found = rows
            .iter()
            .find(|r| r["bytes"].as_u64() == Some(body.len() as u64) && r["status"] == "complete");
        if let Some(row) = found {
            break row.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the good recording was never finalized: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        sha256(&node.export(good_row["id"].as_str().unwrap())),
        sha256(&body)
    );
}

/// Opens `n` HTTP/2 streams and resets each at once, on one connection from `from`. Returns the
/// error code of the GOAWAY the server sent, if it sent one.
async fn rapid_reset(from: IpAddr, to: SocketAddr, n: u32) -> Option<u32> {
    let mut conn = connect_from(from, to).await;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]); // SETTINGS
    let authority = to.to_string();
    for i in 0..n {
        let stream = 1 + 2 * i;
        // HPACK: :method POST (static 3), :scheme http (static 6), :path (name 4) literal,
        // :authority (name 1) literal.
        let mut block = vec![0x83, 0x86, 0x04, 10];
        block.extend_from_slice(b"/v2/record");
        block.extend_from_slice(&[0x01, u8::try_from(authority.len()).unwrap()]);
        block.extend_from_slice(authority.as_bytes());
        frame(&mut out, 0x1, 0x4, stream, &block); // HEADERS, END_HEADERS
        frame(&mut out, 0x3, 0, stream, &8u32.to_be_bytes()); // RST_STREAM CANCEL
    }
    let _ = conn.write_all(&out).await;
    let mut input = Vec::new();
    let _ = tokio::time::timeout(ANSWER_WAIT, conn.read_to_end(&mut input)).await;
    // Walk the server's frames for a GOAWAY.
    let mut at = 0;
    while at + 9 <= input.len() {
        let len = usize::from(input[at]) << 16
            | usize::from(input[at + 1]) << 8
            | usize::from(input[at + 2]);
        let kind = input[at + 3];
        if kind == 0x7 && at + 9 + 8 <= input.len() {
            let code = &input[at + 13..at + 17];
            return Some(u32::from_be_bytes(code.try_into().unwrap()));
        }
        at += 9 + len;
    }
    None
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// One misbehaving connection's way of misbehaving; each stops by itself within seconds.
async fn misbehave(kind: usize, from: IpAddr, to: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(8);
    match kind % 8 {
        // Slow request headers.
        0 => {
            let mut conn = connect_from(from, to).await;
            let _ = conn
                .write_all(b"POST /record HTTP/1.1\r\nHost: x\r\n")
                .await;
            while Instant::now() < deadline {
                if conn.write_all(b"X-Drip: 1\r\n").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // Connected, silent.
        1 => {
            let mut conn = connect_from(from, to).await;
            let mut buf = [0u8; 16];
            let _ = tokio::time::timeout_at(deadline.into(), conn.read(&mut buf)).await;
        }
        // A v1 recording whose header line never ends.
        2 => {
            let mut conn = connect_from(from, to).await;
            let _ = conn
                .write_all(b"POST /record HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"ve\r\n")
                .await;
            let mut buf = [0u8; 256];
            let _ = tokio::time::timeout_at(deadline.into(), conn.read(&mut buf)).await;
        }
        // HTTP/2 rapid reset.
        3 => {
            let _ = tokio::time::timeout_at(deadline.into(), rapid_reset(from, to, 200)).await;
        }
        // Not HTTP.
        4 => {
            let mut conn = connect_from(from, to).await;
            let _ = conn
                .write_all(&[0x16, 0x03, 0x01, 0xff, 0x00, 0x00, 0x00, 0x13, 0x37])
                .await;
            let mut buf = [0u8; 256];
            let _ = tokio::time::timeout_at(deadline.into(), conn.read(&mut buf)).await;
        }
        // A flood of events.
        5 => {
            for _ in 0..30 {
                let _ = exchange(
                    from,
                    to,
                    &sized("POST", "/v2/event", br#"{"type":"request"}"#),
                    true,
                )
                .await;
            }
        }
        // A header line that never ends, over v2.
        6 => {
            if let Ok(mut upload) = start_v2(to).await {
                for _ in 0..8 {
                    if upload.send(&[b'{'; 10 << 10]).await.is_err() {
                        break;
                    }
                }
                let _ = tokio::time::timeout_at(deadline.into(), upload.finish()).await;
            }
        }
        // An event line over the line limit.
        _ => {
            let line = format!("{}[0.1,\"o\",\"{}\"]\n", header(""), "z".repeat(300 << 10));
            let _ = exchange(from, to, &chunked("/record", line.as_bytes(), ""), true).await;
        }
    }
}

/// 200 misbehaving connections from 4 addresses alongside 50 good v2 streams: every good
/// recording is byte-exact and its acks never late.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn misbehaving_connections_do_not_disturb_good_streams() {
    const GOOD: usize = 50;
    const BAD: usize = 200;
    const BAD_ADDRESSES: u8 = 4;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "max_line_bytes = 262144\n[limits]\nheader_timeout = \"3s\"\nhttp_header_timeout = \"2s\"\nevents_per_second_per_peer = 10\nmax_connections_per_peer = 16\n",
    );
    let node = Node::start(dir.path(), &["--config", &config], &[]).await;

    let bodies: Vec<Vec<u8>> = (0..GOOD)
        .map(|i| corpus::generate(100 + i as u64, 96 << 10))
        .collect();
    let mut good = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        // Each good stream from its own host, as 50 SSH servers with a session each.
        let from = IpAddr::from([127, 0, 1, 1 + i as u8]);
        let mut upload = start_v2_from(Some(from), node.ingest).await.unwrap();
        let body = body.clone();
        good.push(tokio::spawn(async move {
            for piece in body.chunks(1024) {
                upload.send(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            upload.finish().await
        }));
    }
    let bad: Vec<_> = (0..BAD)
        .map(|i| {
            let from = ip(2 + (i % usize::from(BAD_ADDRESSES)) as u8);
            tokio::spawn(misbehave(i / usize::from(BAD_ADDRESSES), from, node.ingest))
        })
        .collect();

    for (i, task) in good.into_iter().enumerate() {
        let (result, log) = task.await.unwrap();
        result.unwrap_or_else(|e| panic!("good stream {i}: {e}"));
        let gap = log
            .acks
            .windows(2)
            .map(|w| w[1].0 - w[0].0)
            .max()
            .unwrap_or_default();
        assert!(gap <= ACK_MAX_GAP, "good stream {i}: ack gap {gap:?}");
        assert_eq!(
            log.acks.last().map(|a| a.1),
            Some(bodies[i].len() as u64),
            "good stream {i}: final ack"
        );
    }
    for task in bad {
        task.await.unwrap();
    }
    healthy(&node).await;

    let want: std::collections::BTreeSet<String> = bodies.iter().map(|b| sha256(b)).collect();
    let sizes: std::collections::BTreeSet<u64> = bodies.iter().map(|b| b.len() as u64).collect();
    let deadline = Instant::now() + ANSWER_WAIT;
    let rows = loop {
        let rows: Vec<_> = node
            .list()
            .into_iter()
            .filter(|r| {
                r["status"] == "complete" && r["bytes"].as_u64().is_some_and(|b| sizes.contains(&b))
            })
            .collect();
        if rows.len() >= GOOD {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "only {} good recordings finalized",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let got: std::collections::BTreeSet<String> = rows
        .iter()
        .map(|r| sha256(&node.export(r["id"].as_str().unwrap())))
        .collect();
    assert_eq!(got, want, "good recordings are not byte-exact");
    let metrics =
        String::from_utf8(common::http_get(node.web, "/metrics").await.unwrap().1).unwrap();
    assert!(
        !metrics.contains("castvault_ingest_limit_refusals_total 0\n"),
        "no limit was reached"
    );
}

/// A self-signed certificate for 127.0.0.1 made by the openssl CLI, written to `cert` and `key`.
fn make_cert(cert: &Path, key: &Path, name: &str) {
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// curl over HTTPS trusting only `ca`; the HTTP version and body, or curl's error.
fn curl_https(ca: &Path, addr: SocketAddr, path: &str) -> Result<(String, String), String> {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args(["-w", "\n%{http_version}", &format!("https://{addr}{path}")])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let (body, version) = text.rsplit_once('\n').unwrap_or((&text, ""));
    Ok((version.to_owned(), body.trim_end().to_owned()))
}

/// The web listener serves HTTPS from certificate files (h2 and HTTP/1.1 by ALPN), picks up a
/// renewed certificate without a restart, keeps serving when a renewal is broken, and a
/// non-loopback listener without TLS is a config error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_tls_reloads_certificates_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let (old_ca, new_ca) = (dir.path().join("old.pem"), dir.path().join("new.pem"));
    make_cert(&cert, &key, "first");
    std::fs::copy(&cert, &old_ca).unwrap();
    let config = write_config(
        &dir.path().join("node"),
        &format!(
            "[web_tls]\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    );
    let node = Node::start_tls(&dir.path().join("node"), &["--config", &config], &old_ca).await;

    let (version, body) = curl_https(&old_ca, node.web, "/healthz").unwrap();
    assert_eq!((version.as_str(), body.as_str()), ("2", "ok"));
    // Plain HTTP to the TLS listener gets nothing useful.
    assert!(common::http_get(node.web, "/healthz").await.is_err());

    // Renewal: new files in place; the node serves the new certificate within seconds.
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    make_cert(&staging.join("tls.crt"), &staging.join("tls.key"), "second");
    std::fs::copy(staging.join("tls.crt"), &new_ca).unwrap();
    assert!(curl_https(&new_ca, node.web, "/healthz").is_err());
    std::fs::copy(staging.join("tls.key"), &key).unwrap();
    std::fs::copy(staging.join("tls.crt"), &cert).unwrap();
    let deadline = Instant::now() + ANSWER_WAIT;
    while curl_https(&new_ca, node.web, "/healthz").is_err() {
        assert!(
            Instant::now() < deadline,
            "renewed certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(curl_https(&old_ca, node.web, "/healthz").is_err());

    // A broken renewal (a key that does not match) keeps the working certificate.
    make_cert(
        &staging.join("other.crt"),
        &staging.join("other.key"),
        "third",
    );
    std::fs::copy(staging.join("other.key"), &key).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(curl_https(&new_ca, node.web, "/healthz").unwrap().1, "ok");

    // Plain HTTP on a non-loopback address is refused unless explicitly allowed.
    let open = write_config(&dir.path().join("open"), "web_listen = \"0.0.0.0:8081\"\n");
    let check = config_check(&open);
    assert_eq!(check.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&check.stderr).contains("web_listen 0.0.0.0:8081 is not loopback")
    );
    let allowed = write_config(
        &dir.path().join("allowed"),
        "web_listen = \"0.0.0.0:8081\"\nallow_plain_http = true\n",
    );
    let check = config_check(&allowed);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// Secrets (store keys, SAS tokens, ingest and access tokens) never appear in the node's logs,
/// `config check` output or metrics, even when the store they open fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_logs_checks_and_metrics() {
    const KEY: &str = "c2VjcmV0LWFjY2Vzcy1rZXktZG8tbm90LWxlYWs=";
    const SAS: &str = "sv=2024-01-01&ss=b&srt=co&sp=rwl&sig=DoNotLeakThisSignature123";
    let dir = tempfile::tempdir().unwrap();
    let dead = common::dead_addr();
    let text = format!(
        "[regions.far]\nstore = \"az://recordings\"\nstore_options = {{ account_name = \"devstoreaccount1\", access_key = \"{KEY}\", endpoint = \"http://{dead}/devstoreaccount1\", allow_http = \"true\" }}\n\
         [regions.sas]\nstore = \"az://recordings\"\nstore_options = {{ account_name = \"devstoreaccount1\", sas_key = \"{SAS}\", endpoint = \"http://{dead}/devstoreaccount1\", allow_http = \"true\" }}\n\
         [[routing]]\nregion = \"far\"\nssh_user = [\"far\"]\n\
         [[routing]]\nregion = \"sas\"\nssh_user = [\"sas\"]\n"
    );
    let config = write_config(&dir.path().join("node"), &text);
    let log = dir.path().join("node.log");
    let node = Node::start_logged(&dir.path().join("node"), &["--config", &config], &log).await;
    // Recordings routed to the unreachable stores: uploads fail and are retried, and logged.
    for user in ["far", "sas"] {
        let body = format!(
            "{{\"version\":2,\"width\":80,\"height\":24,\"sshUser\":\"{user}\"}}\n[0.1,\"o\",\"x\"]\n"
        );
        let _ = record_v1(node.ingest, body.as_bytes(), "").await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let metrics = common::http_get(node.web, "/metrics").await.unwrap().1;
    let (_, uploads) = node.api("/api/v1/uploads").await;
    drop(node);
    let bad = write_config(
        &dir.path().join("bad"),
        &format!("{text}[admission]\nallow_cidrs = [\"nope\"]\n"),
    );
    let check = config_check(&bad);
    assert_eq!(check.status.code(), Some(1));
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        logs.contains("upload failed"),
        "the failing store was never logged:\n{logs}"
    );
    for (what, haystack) in [
        ("logs", logs),
        ("metrics", String::from_utf8_lossy(&metrics).into_owned()),
        (
            "uploads API",
            String::from_utf8_lossy(&uploads).into_owned(),
        ),
        (
            "config check",
            String::from_utf8_lossy(&check.stderr).into_owned()
                + &String::from_utf8_lossy(&check.stdout),
        ),
    ] {
        for secret in [KEY, "DoNotLeakThisSignature123"] {
            assert!(!haystack.contains(secret), "{what} shows a secret");
        }
    }
}

/// A stream over its event rate is read more slowly, not cut: every byte is stored, acks keep
/// coming, and the throttling shows in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_over_its_event_rate_is_slowed_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[limits]\nstream_events_per_second = 500\nstream_event_burst = 500\n",
    );
    let node = Node::start(dir.path(), &["--config", &config], &[]).await;
    let mut body = header("").into_bytes();
    for i in 0..2500 {
        body.extend_from_slice(
            format!("[{}.{:03},\"o\",\"line {i}\\r\\n\"]\n", i / 1000, i % 1000).as_bytes(),
        );
    }
    let mut upload = start_v2(node.ingest).await.unwrap();
    for piece in body.chunks(4096) {
        upload.send(piece).await.unwrap();
    }
    let (result, log) = upload.finish().await;
    result.unwrap();
    assert_eq!(log.acks.last().map(|a| a.1), Some(body.len() as u64));
    let gap = log
        .acks
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap_or_default();
    assert!(gap <= ACK_MAX_GAP, "ack gap {gap:?} while throttled");
    let rows = node.wait_finalized(1).await;
    assert_eq!(
        sha256(&node.export(rows[0]["id"].as_str().unwrap())),
        sha256(&body)
    );
    let metrics =
        String::from_utf8(common::http_get(node.web, "/metrics").await.unwrap().1).unwrap();
    let throttled: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("castvault_ingest_stream_throttled_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(throttled > 0, "the stream was never throttled");
}
