//! Test harness: starts the real `castvault` binary and real Azurite, and plays the part of a
//! Tailscale client exactly as shared PROTOCOL.md describes it.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../../benches/corpus/mod.rs"]
pub mod corpus;
pub mod ssh;
pub mod tmux;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

pub const BIN: &str = env!("CARGO_BIN_EXE_castvault");

/// Client-side constants from tailscale's sessionrecording/connect.go.
pub const PER_DIAL_TIMEOUT: Duration = Duration::from_secs(5);
pub const HTTP2_PROBE_TIMEOUT: Duration = Duration::from_secs(10);
pub const UPLOAD_ACK_WINDOW: Duration = Duration::from_secs(30);

pub fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A running `castvault serve`.
pub struct Node {
    child: Option<Child>,
    pub ingest: SocketAddr,
    pub web: SocketAddr,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Node {
    /// Starts a node on 127.0.0.1:0 with `extra` arguments, and waits for `/readyz`.
    pub async fn start(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let args: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Self::spawn(data_dir.to_owned(), args, env).await
    }

    /// [`Self::start`] with the node's log written to `log`.
    pub async fn start_logged(data_dir: &Path, extra: &[&str], log: &Path) -> Self {
        let args: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        Self::spawn_with(data_dir.to_owned(), args, Vec::new(), Some(log), None).await
    }

    /// [`Self::start`] for a node whose web listener serves HTTPS with a certificate `ca` trusts.
    pub async fn start_tls(data_dir: &Path, extra: &[&str], ca: &Path) -> Self {
        let args: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        Self::spawn_with(data_dir.to_owned(), args, Vec::new(), None, Some(ca)).await
    }

    async fn spawn(data_dir: PathBuf, args: Vec<String>, env: Vec<(String, String)>) -> Self {
        Self::spawn_with(data_dir, args, env, None, None).await
    }

    async fn spawn_with(
        data_dir: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
        log: Option<&Path>,
        tls_ca: Option<&Path>,
    ) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .args([
                "--ingest-listen",
                "127.0.0.1:0",
                "--web-listen",
                "127.0.0.1:0",
            ])
            .args(&args)
            .env("RUST_LOG", "castvault=info,warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(match log {
                Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
                None => Stdio::inherit(),
            });
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn castvault");
        let stdout = child.stdout.take().unwrap();
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).unwrap();
            line
        })
        .await
        .unwrap();
        let addrs: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad first line {line:?}: {e}"));
        let node = Self {
            child: Some(child),
            ingest: addrs["ingest"].as_str().unwrap().parse().unwrap(),
            web: addrs["web"].as_str().unwrap().parse().unwrap(),
            data_dir,
            args,
            env,
        };
        match tls_ca {
            None => node.wait_ready().await,
            Some(ca) => {
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let ok = Command::new("curl")
                        .args(["-sf", "--max-time", "5", "--cacert"])
                        .arg(ca)
                        .arg(format!("https://{}/readyz", node.web))
                        .output()
                        .is_ok_and(|o| o.status.success());
                    if ok {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "node never became ready over TLS"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        node
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http_get(self.web, "/readyz").await {
                return;
            }
            assert!(Instant::now() < deadline, "node never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        child.wait().unwrap()
    }

    /// A new process on the same data dir and arguments.
    pub async fn restart(&mut self) {
        self.kill9();
        let restarted =
            Self::spawn(self.data_dir.clone(), self.args.clone(), self.env.clone()).await;
        *self = restarted;
    }

    /// Runs a CLI subcommand against this node's store.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_via(None, args)
    }

    /// [`Self::cli`] under a wrapper program and its options (`/usr/bin/time -f %M`).
    pub fn cli_via(&self, wrapper: Option<(&str, &[&str])>, args: &[&str]) -> std::process::Output {
        let flag = |name: &str| self.args.iter().position(|a| a == name);
        let store_args: Vec<String> = match (flag("--store"), flag("--config")) {
            (Some(i), _) => vec!["--store".into(), self.args[i + 1].clone()],
            (None, Some(i)) => vec![
                "--config".into(),
                self.args[i + 1].clone(),
                "--data-dir".into(),
                self.data_dir.display().to_string(),
            ],
            (None, None) => vec!["--data-dir".into(), self.data_dir.display().to_string()],
        };
        let mut cmd = match wrapper {
            Some((program, options)) => {
                let mut cmd = Command::new(program);
                cmd.args(options).arg(BIN);
                cmd
            }
            None => Command::new(BIN),
        };
        cmd.args(args).args(&store_args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    /// The admin token a node without `[access]` makes in its data directory.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin-token"))
            .expect("admin token")
            .trim()
            .to_owned()
    }

    /// GET on the web listener as the admin.
    pub async fn api(&self, path: &str) -> (u16, Vec<u8>) {
        http_get_as(self.web, path, Some(&self.admin_token()))
            .await
            .unwrap()
    }

    /// `castvault recordings list --json`.
    pub fn list(&self) -> Vec<serde_json::Value> {
        let out = self.cli(&["recordings", "list", "--json"]);
        assert!(
            out.status.success(),
            "list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Waits until `n` recordings are listed with a final status; returns them.
    pub async fn wait_finalized(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let rows = self.list();
            let done: Vec<_> = rows.into_iter().filter(|r| r["status"] != "live").collect();
            if done.len() >= n {
                return done;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} recordings finalized",
                done.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `castvault export ID --format cast`, as bytes.
    pub fn export(&self, id: &str) -> Vec<u8> {
        let out = self.cli(&["export", id, "--format", "cast"]);
        assert!(
            out.status.success(),
            "export failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A plain HTTP/1.1 GET; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>), String> {
    http_get_as(addr, path, None).await
}

/// A plain HTTP/1.1 GET with a bearer token; returns status and body.
pub async fn http_get_as(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, Vec<u8>), String> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    http_get_with(addr, path, &headers).await
}

/// A plain HTTP/1.1 GET with extra headers; returns status and body.
pub async fn http_get_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, Vec<u8>), String> {
    let (status, _, body) = http_get_full(addr, path, headers).await?;
    Ok((status, body))
}

/// A plain HTTP/1.1 GET with extra headers; returns status, response headers and body.
pub async fn http_get_full(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, hyper::HeaderMap, Vec<u8>), String> {
    let resp = get_response(addr, path, headers).await?;
    let status = resp.status().as_u16();
    let response_headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes()
        .to_vec();
    Ok((status, response_headers, body))
}

/// Sends an HTTP/1.1 GET and returns the response with its body still streaming.
async fn get_response(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = hyper::Request::get(path).header("host", addr.to_string());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Empty::<Bytes>::new()).unwrap();
    send.send_request(req).await.map_err(|e| e.to_string())
}

/// What a v2 upload saw.
#[derive(Debug, Default, Clone)]
pub struct AckLog {
    pub acks: Vec<(Instant, u64)>,
    pub error: Option<String>,
}

/// An upload in progress over v2 (h2c prior knowledge).
pub struct V2Upload {
    tx: Option<mpsc::Sender<Bytes>>,
    pub sent: u64,
    pub log: Arc<Mutex<AckLog>>,
    reader: tokio::task::JoinHandle<Result<(), String>>,
}

type BodyTx = mpsc::Sender<Bytes>;

fn channel_body(
    capacity: usize,
) -> (
    BodyTx,
    StreamBody<impl futures::Stream<Item = Result<Frame<Bytes>, std::convert::Infallible>>>,
) {
    let (tx, rx) = mpsc::channel::<Bytes>(capacity);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
    });
    (tx, StreamBody::new(stream))
}

/// A TCP dial as Go's client makes it: 5 s timeout, TCP_NODELAY (Go's default).
async fn dial(addr: SocketAddr) -> Result<TcpStream, String> {
    dial_from(None, addr).await
}

/// [`dial`] from a chosen local address (another loopback address plays another host).
async fn dial_from(from: Option<std::net::IpAddr>, addr: SocketAddr) -> Result<TcpStream, String> {
    let connect = async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        if let Some(from) = from {
            socket.bind(SocketAddr::new(from, 0))?;
        }
        socket.connect(addr).await
    };
    let stream = tokio::time::timeout(PER_DIAL_TIMEOUT, connect)
        .await
        .map_err(|_| "dial timeout".to_owned())?
        .map_err(|e| format!("dial: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("nodelay: {e}"))?;
    Ok(stream)
}

/// h2c connection, as Go's `http.Transport` with unencrypted HTTP/2 only.
pub async fn h2_connect(
    addr: SocketAddr,
) -> Result<
    hyper::client::conn::http2::SendRequest<
        StreamBody<
            futures::stream::BoxStream<'static, Result<Frame<Bytes>, std::convert::Infallible>>,
        >,
    >,
    String,
> {
    h2_connect_from(None, addr).await
}

/// [`h2_connect`] from a chosen local address.
pub async fn h2_connect_from(
    from: Option<std::net::IpAddr>,
    addr: SocketAddr,
) -> Result<
    hyper::client::conn::http2::SendRequest<
        StreamBody<
            futures::stream::BoxStream<'static, Result<Frame<Bytes>, std::convert::Infallible>>,
        >,
    >,
    String,
> {
    let stream = dial_from(from, addr).await?;
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(send)
}

fn empty_h2_body()
-> StreamBody<futures::stream::BoxStream<'static, Result<Frame<Bytes>, std::convert::Infallible>>> {
    use futures::StreamExt;
    StreamBody::new(futures::stream::empty().boxed())
}

/// `HEAD /v2/record` over h2c; true only for a 200 over HTTP/2.
pub async fn probe_v2(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut send = h2_connect(addr).await?;
        let req = hyper::Request::head(format!("http://{addr}/v2/record"))
            .body(empty_h2_body())
            .unwrap();
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(resp.status() == 200 && resp.version() == hyper::Version::HTTP_2)
    };
    matches!(
        tokio::time::timeout(HTTP2_PROBE_TIMEOUT, attempt).await,
        Ok(Ok(true))
    )
}

/// Starts `POST /v2/record`: waits for the 200 headers before any body byte, then reads acks
/// with the client's 30 s ack timer.
pub async fn start_v2(addr: SocketAddr) -> Result<V2Upload, String> {
    start_v2_from(None, addr).await
}

/// [`start_v2`] from a chosen local address.
pub async fn start_v2_from(
    from: Option<std::net::IpAddr>,
    addr: SocketAddr,
) -> Result<V2Upload, String> {
    use futures::StreamExt;
    let mut send = h2_connect_from(from, addr).await?;
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
    })
    .boxed();
    let req = hyper::Request::post(format!("http://{addr}/v2/record"))
        .header("user-agent", "Go-http-client/2.0")
        .header("accept-encoding", "gzip")
        .body(StreamBody::new(stream))
        .unwrap();
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("recording: error starting recording: {e}"))?;
    if resp.status() != 200 {
        return Err(format!("recording: unexpected status: {}", resp.status()));
    }
    assert!(
        resp.headers().get("content-encoding").is_none(),
        "ack stream must not be compressed"
    );
    let log = Arc::new(Mutex::new(AckLog::default()));
    let reader_log = log.clone();
    let reader = tokio::spawn(async move {
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        loop {
            let frame = match tokio::time::timeout(UPLOAD_ACK_WINDOW, body.frame()).await {
                Err(_) => {
                    return Err("did not receive ack frames from the recorder in 30s".to_owned());
                }
                Ok(None) => return Ok(()),
                Ok(Some(Err(e))) => return Err(format!("unexpected error receiving acks: {e}")),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let v: serde_json::Value = serde_json::from_slice(&line)
                    .map_err(|e| format!("unexpected error receiving acks: {e}"))?;
                let mut log = reader_log.lock().unwrap();
                if let Some(ack) = v.get("ack").and_then(serde_json::Value::as_u64) {
                    if let Some(&(_, last)) = log.acks.last() {
                        assert!(ack >= last, "ack went backwards: {last} then {ack}");
                    }
                    log.acks.push((Instant::now(), ack));
                }
                if let Some(err) = v.get("error").and_then(serde_json::Value::as_str) {
                    log.error = Some(err.to_owned());
                    return Err(format!("received error from the recorder: {err}"));
                }
            }
        }
    });
    Ok(V2Upload {
        tx: Some(tx),
        sent: 0,
        log,
        reader,
    })
}

impl V2Upload {
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        let tx = self.tx.as_ref().ok_or("body closed")?;
        tx.send(Bytes::copy_from_slice(bytes))
            .await
            .map_err(|_| "body stream closed".to_owned())?;
        self.sent += bytes.len() as u64;
        Ok(())
    }

    pub fn last_ack(&self) -> u64 {
        self.log.lock().unwrap().acks.last().map_or(0, |a| a.1)
    }

    /// Waits until an ack covers at least `n` bytes.
    pub async fn wait_ack(&self, n: u64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.last_ack() >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    /// Ends the body (END_STREAM) and waits for the response to end.
    pub async fn finish(mut self) -> (Result<(), String>, AckLog) {
        self.tx.take();
        let result = match tokio::time::timeout(Duration::from_secs(60), self.reader).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("response did not end".to_owned()),
        };
        let log = self.log.lock().unwrap().clone();
        (result, log)
    }
}

/// `POST /record` over HTTP/1.1 exactly as Go sends it: chunked, `Expect: 100-continue`, waiting
/// for the interim 100 before the first body byte. Returns the final status.
pub async fn upload_v1(addr: SocketAddr, pieces: &[&[u8]]) -> Result<u16, String> {
    let stream = dial(addr).await?;
    let (read, mut write) = stream.into_split();
    let mut read = tokio::io::BufReader::new(read);
    let head = format!(
        "POST /record HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: Go-http-client/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\nAccept-Encoding: gzip\r\n\r\n"
    );
    write
        .write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let status = read_status(&mut read).await?;
    if status != 100 {
        return Err(format!("recording: unexpected status: {status}"));
    }
    let mut body = Vec::new();
    for piece in pieces.iter().filter(|p| !p.is_empty()) {
        body.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        body.extend_from_slice(piece);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    // A server that refuses the body answers and closes before reading the rest, so the write
    // can fail with a broken pipe; like Go's transport, read the answer before giving up.
    let written = write.write_all(&body).await;
    match (read_status(&mut read).await, written) {
        (Ok(status), _) => Ok(status),
        (Err(_), Err(e)) => Err(e.to_string()),
        (Err(e), Ok(())) => Err(e),
    }
}

async fn read_status<R: tokio::io::AsyncBufRead + Unpin>(read: &mut R) -> Result<u16, String> {
    let mut status_line = String::new();
    read.read_line(&mut status_line)
        .await
        .map_err(|e| e.to_string())?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(format!("bad status line {status_line:?}"))?;
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        read.read_line(&mut line).await.map_err(|e| e.to_string())?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; content_length];
    read.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok(status)
}

/// Which protocol a connection attempt used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Used {
    V2,
    V1,
}

/// The client's per-address algorithm (ConnectToRecorder): probe, v2 or v1 fallback, next
/// address on failure. Uploads `body` in `piece`-sized writes. Returns the address used and how.
pub async fn connect_and_upload(
    addrs: &[SocketAddr],
    body: &[u8],
    piece: usize,
) -> Result<(SocketAddr, Used, AckLog), Vec<String>> {
    let mut attempts = Vec::new();
    for &addr in addrs {
        if probe_v2(addr).await {
            match start_v2(addr).await {
                Ok(mut upload) => {
                    for p in body.chunks(piece) {
                        if let Err(e) = upload.send(p).await {
                            attempts.push(format!("{addr}: {e}"));
                            break;
                        }
                    }
                    let (result, log) = upload.finish().await;
                    match result {
                        Ok(()) => return Ok((addr, Used::V2, log)),
                        Err(e) => {
                            attempts.push(format!("{addr}: {e}"));
                            return Err(attempts);
                        }
                    }
                }
                Err(e) => {
                    attempts.push(format!(
                        "recording: error starting recording on {addr:?}: {e}"
                    ));
                    continue;
                }
            }
        }
        let pieces: Vec<&[u8]> = body.chunks(piece).collect();
        match upload_v1(addr, &pieces).await {
            Ok(200) => return Ok((addr, Used::V1, AckLog::default())),
            Ok(status) => attempts.push(format!("{addr}: recording: unexpected status: {status}")),
            Err(e) => attempts.push(format!(
                "recording: error starting recording on {addr:?}: {e}"
            )),
        }
    }
    Err(attempts)
}

/// A TCP relay on 127.0.0.1:0 in front of a server, to cut a client off from it (a network
/// outage) while the server itself keeps running. Closing drops every relayed connection, and
/// every new one until it opens again.
pub struct Gate {
    pub addr: SocketAddr,
    open: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = std::sync::Arc::new(tokio::sync::watch::channel(true).0);
        let gate = open.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut is_open = gate.subscribe();
                if !*is_open.borrow_and_update() {
                    continue; // dropped: closed before a byte of the request is read
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = is_open.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Self { addr, open, task }
    }

    pub fn close(&self) {
        self.open.send_replace(false);
    }

    pub fn open(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Real Azurite, started from the test tools' npm lockfile, on a free loopback port.
pub struct Azurite {
    child: Option<Child>,
    pub url: String,
    port: u16,
    dir: tempfile::TempDir,
}

/// Azurite's public, well-known account key.
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Account SAS for Azurite's public well-known key (shared DEPENDENCIES.md 1).
const AZURITE_SAS: &str = "sv=2020-08-04&ss=b&srt=sco&sp=rwdlac&st=2020-01-01T00%3A00%3A00Z&se=2099-01-01T00%3A00%3A00Z&spr=https%2Chttp&sig=JAxgQZsc6imr9R3HrDTg4G71700iSnrSTDgEWtEbCsQ%3D";

impl Azurite {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut azurite = Self {
            child: None,
            url: format!("http://127.0.0.1:{port}"),
            port,
            dir,
        };
        azurite.resume().await;
        azurite
    }

    /// The emulator's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Stops the emulator (its data stays on disk), as a storage outage.
    /// SIGTERM: Azurite saves its metadata on the way out (a SIGKILL can roll back its last
    /// writes, which real Azure never does).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub async fn resume(&mut self) {
        let bin = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/tools/node_modules/.bin/azurite-blob");
        assert!(
            bin.exists(),
            "Azurite is missing at {}: run the README's test command (it installs tests/tools with npm ci)",
            bin.display()
        );
        let port = self.port;
        let child = Command::new(bin)
            .args([
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                &port.to_string(),
                "--location",
            ])
            .arg(self.dir.path())
            .args(["--disableTelemetry", "--silent"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn azurite");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(addr, "/").await.is_err() {
            assert!(Instant::now() < deadline, "Azurite did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `store_options` reaching this emulator by its endpoint (not `use_emulator`, which reads
    /// one global variable), so one node can use several.
    pub fn store_options(&self) -> std::collections::BTreeMap<String, String> {
        [
            ("account_name", "devstoreaccount1".to_owned()),
            ("access_key", AZURITE_KEY.to_owned()),
            ("endpoint", format!("{}/devstoreaccount1", self.url)),
            ("allow_http", "true".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// [`Self::store_options`] reaching this emulator through `gate`.
    pub fn store_options_via(&self, gate: &Gate) -> std::collections::BTreeMap<String, String> {
        let mut options = self.store_options();
        options.insert(
            "endpoint".to_owned(),
            format!("http://{}/devstoreaccount1", gate.addr),
        );
        options
    }

    /// [`Self::store_options`] as an inline TOML table.
    pub fn store_options_toml(&self) -> String {
        options_toml(&self.store_options())
    }

    /// Creates a container (object_store cannot).
    pub async fn create_container(&self, name: &str) {
        let status = put_empty(
            &self.url,
            &format!("/devstoreaccount1/{name}?restype=container&{AZURITE_SAS}"),
        )
        .await;
        assert!(status == 201 || status == 409, "create container: {status}");
    }

    /// Environment for a node or CLI using `az://` on this Azurite.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR", "true".to_owned()),
            ("AZURITE_BLOB_STORAGE_URL", self.url.clone()),
        ]
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback address with nothing listening.
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A recorder that refuses everything with `status` (the client must move on).
pub async fn refusing_recorder(status: u16) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .fallback(move || async move { axum::http::StatusCode::from_u16(status).unwrap() });
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// One server-sent event: its `event:` name (if any) and its `data:`.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

/// Opens a server-sent-event stream over HTTP/1.1; events arrive on the receiver until the
/// server ends the response (or the receiver is dropped).
pub async fn sse(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<mpsc::Receiver<SseEvent>, String> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("accept", "text/event-stream")];
    headers.extend(auth.iter().map(|a| ("authorization", a.as_str())));
    let resp = get_response(addr, path, &headers).await?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()));
    }
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        let mut event = SseEvent {
            event: None,
            data: String::new(),
        };
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line)
                    .trim_end_matches(['\r', '\n'])
                    .to_owned();
                if line.is_empty() {
                    if !event.data.is_empty() || event.event.is_some() {
                        let done = std::mem::replace(
                            &mut event,
                            SseEvent {
                                event: None,
                                data: String::new(),
                            },
                        );
                        if tx.send(done).await.is_err() {
                            return;
                        }
                    }
                } else if let Some(v) = line.strip_prefix("data:") {
                    event.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                } else if let Some(v) = line.strip_prefix("event:") {
                    event.event = Some(v.trim().to_owned());
                }
            }
        }
    });
    Ok(rx)
}

/// A real S3-compatible server: moto's standalone server (PyPI `moto[server]`, installed into
/// the test venv by the README's test command), on a free loopback port.
pub struct Moto {
    child: Child,
    pub url: String,
}

impl Moto {
    pub async fn start() -> Self {
        let bin = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|dir| dir.join("moto_server"))
            .find(|p| p.exists())
            .expect("moto_server is not on PATH: run the README's test command (it installs moto into target/test-venv)");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn moto_server");
        let moto = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_get(addr, "/").await.is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        moto
    }

    /// `store_options` for `s3://BUCKET` on this server (moto accepts any key pair).
    pub fn store_options(&self) -> std::collections::BTreeMap<String, String> {
        [
            ("access_key_id", "castvault-test".to_owned()),
            ("secret_access_key", "castvault-test-secret".to_owned()),
            ("region", "us-east-1".to_owned()),
            ("endpoint", self.url.clone()),
            ("allow_http", "true".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// [`Self::store_options`] as an inline TOML table.
    pub fn store_options_toml(&self) -> String {
        options_toml(&self.store_options())
    }

    /// Creates a bucket (object_store cannot): an unsigned path-style `PUT /BUCKET`, which moto
    /// accepts.
    pub async fn create_bucket(&self, name: &str) {
        let status = put_empty(&self.url, &format!("/{name}")).await;
        assert!(status == 200 || status == 409, "create bucket: {status}");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An empty `PUT` to `http://ADDR` + `path`; the response's status.
async fn put_empty(base: &str, path: &str) -> u16 {
    let addr: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::put(path)
        .header("host", addr.to_string())
        .header("content-length", "0")
        .body(Empty::<Bytes>::new())
        .unwrap();
    send.send_request(req).await.unwrap().status().as_u16()
}

/// Store options as an inline TOML table, for a config's `store_options`.
pub fn options_toml(options: &std::collections::BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = options
        .iter()
        .map(|(k, v)| format!("{k} = {v:?}"))
        .collect();
    format!("{{ {} }}", pairs.join(", "))
}

/// User plus system CPU seconds a process (a PID, or `self`) has used, from /proc/PID/stat.
pub fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which ends at the last ')': utime and stime are 12 and 13
    // (0-based 11 and 12), in ticks of 1/100 s.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}
