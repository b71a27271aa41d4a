//! The gateway's side of the session-recording wire protocol: the client that Tailscale SSH runs
//! (shared PROTOCOL.md sections 1 and 3), with the recorder list tried in order.
//!
//! Per recorder: `HEAD /v2/record` over h2c; on 200 over HTTP/2, `POST /v2/record` on the same
//! connection, body written only after the response headers arrived; the ack stream is read for
//! the whole session, and a recording fails when it carries an error frame, ends early, or goes
//! [`ACK_WINDOW`] without a frame. A recorder that fails at start is skipped for the next one.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};

/// Longest time to dial one recorder (Tailscale: `perDialAttemptTimeout`).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest time for the v2 probe and the POST's response headers (Tailscale:
/// `http2ProbeTimeout`).
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// No ack frame for this long means the recording failed (Tailscale: `uploadAckWindow`).
pub const ACK_WINDOW: Duration = Duration::from_secs(30);
/// Frames queued for the recorder; when full, the session waits (its output is never dropped),
/// which slows the user's terminal rather than losing what it showed.
pub const QUEUE_FRAMES: usize = 256;
/// Queued lines joined into one body write up to about this many bytes (castvault's ingest
/// takes DATA frames of up to 64 KiB; fewer, larger frames cost both ends less per byte).
const FRAME_BYTES: usize = 64 << 10;
/// Size of each buffer event lines are written into: a fresh one when the last is full, so
/// consecutive lines sit side by side. Each session holds one (a busy one a few, until the
/// recorder has taken their lines).
const LINES_BYTES: usize = 64 << 10;
/// How long the end of a session waits for the recorder's final ack.
pub const FINAL_ACK_WAIT: Duration = Duration::from_secs(20);

type Body =
    StreamBody<futures::stream::BoxStream<'static, Result<Frame<Bytes>, std::convert::Infallible>>>;

/// A recording in progress.
pub struct Recording {
    tx: Option<mpsc::Sender<BytesMut>>,
    /// Where lines are written: each is split off and sent, and lines still queued together
    /// are joined again without a copy (they sit side by side in one allocation).
    lines: BytesMut,
    started: Instant,
    sent: u64,
    /// `None` while healthy; the reason once the recording failed.
    failed: watch::Receiver<Option<String>>,
    acked: watch::Receiver<u64>,
    /// The recorder that took it.
    pub recorder: SocketAddr,
    utf8: Utf8Carry,
    record_input: bool,
}

/// Starts a recording on the first recorder that accepts it. `header` is the asciicast header
/// object; `token` goes in `Authorization: Bearer` (castvault's ingest admission).
///
/// # Errors
/// Every recorder's failure, in order, as Tailscale reports them.
pub async fn start(
    recorders: &[SocketAddr],
    token: Option<&str>,
    header: &Map<String, Value>,
    record_input: bool,
) -> Result<Recording, Vec<String>> {
    let mut attempts = Vec::new();
    for &addr in recorders {
        match tokio::time::timeout(START_TIMEOUT, start_one(addr, token)).await {
            Ok(Ok((tx, failed, acked))) => {
                let mut recording = Recording {
                    tx: Some(tx),
                    started: Instant::now(),
                    sent: 0,
                    failed,
                    acked,
                    recorder: addr,
                    utf8: Utf8Carry::default(),
                    record_input,
                    lines: BytesMut::new(),
                };
                let mut line = serde_json::to_vec(header).unwrap_or_default();
                line.push(b'\n');
                if recording.send(BytesMut::from(&line[..])).await.is_ok() {
                    return Ok(recording);
                }
                attempts.push(format!(
                    "recording: error starting recording on {addr}: recorder closed the stream"
                ));
            }
            Ok(Err(e)) => attempts.push(format!(
                "recording: error starting recording on {addr}: {e}"
            )),
            Err(_) => attempts.push(format!(
                "recording: error starting recording on {addr}: timed out"
            )),
        }
    }
    Err(attempts)
}

type Started = (
    mpsc::Sender<BytesMut>,
    watch::Receiver<Option<String>>,
    watch::Receiver<u64>,
);

async fn start_one(addr: SocketAddr, token: Option<&str>) -> Result<Started, String> {
    let stream = tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| "dial timed out".to_owned())?
        .map_err(|e| format!("dial: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Body>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .map_err(|e| format!("h2: {e}"))?;
    tokio::spawn(conn);
    let empty: Body = StreamBody::new(futures::stream::empty().boxed());
    let probe = hyper::Request::head(format!("http://{addr}/v2/record"))
        .body(empty)
        .map_err(|e| e.to_string())?;
    let probed = send
        .send_request(probe)
        .await
        .map_err(|e| format!("probe: {e}"))?;
    if probed.status() != hyper::StatusCode::OK {
        return Err(format!("unexpected status: {}", probed.status()));
    }
    let (tx, rx) = mpsc::channel::<BytesMut>(QUEUE_FRAMES);
    // Lines queued meanwhile go out together, as one DATA frame, as long as they were written
    // side by side in one buffer: joining those copies nothing. A line in another buffer
    // starts the next frame instead (joining it would copy it: under a fast `cat` that copy
    // and its reallocation were about 4% of the gateway's CPU in a `perf` profile).
    let body = futures::stream::unfold((rx, None), |(mut rx, held)| async move {
        let mut frame = match held {
            Some(frame) => frame,
            None => rx.recv().await?,
        };
        let mut next = None;
        while frame.len() < FRAME_BYTES {
            match rx.try_recv() {
                Ok(more) if adjacent(&frame, &more) => frame.unsplit(more),
                Ok(more) => {
                    next = Some(more);
                    break;
                }
                Err(_) => break,
            }
        }
        Some((Ok(Frame::data(frame.freeze())), (rx, next)))
    })
    .boxed();
    let mut request = hyper::Request::post(format!("http://{addr}/v2/record"))
        .header("user-agent", "castvault-gateway");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request
        .body(StreamBody::new(body))
        .map_err(|e| e.to_string())?;
    let response = send
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    if response.status() != hyper::StatusCode::OK {
        let status = response.status();
        let text = response
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
            .unwrap_or_default();
        return Err(format!("unexpected status: {status}: {text}"));
    }
    let (failed_tx, failed) = watch::channel(None);
    let (acked_tx, acked) = watch::channel(0u64);
    tokio::spawn(read_acks(response.into_body(), failed_tx, acked_tx));
    Ok((tx, failed, acked))
}

/// True when `next` starts where `frame` ends in memory, so `frame.unsplit(next)` needs no
/// copy (it still copies if they are adjacent but from two allocations, which is only slower).
fn adjacent(frame: &BytesMut, next: &BytesMut) -> bool {
    frame.as_ptr().wrapping_add(frame.len()) == next.as_ptr()
}

/// Reads the ack stream until it ends; a failure is published on `failed`.
async fn read_acks(
    mut body: hyper::body::Incoming,
    failed: watch::Sender<Option<String>>,
    acked: watch::Sender<u64>,
) {
    let mut buf = Vec::new();
    loop {
        let frame = match tokio::time::timeout(ACK_WINDOW, body.frame()).await {
            Err(_) => {
                let _ = failed.send(Some("recorder sent no ack for 30s".to_owned()));
                return;
            }
            Ok(None) => {
                // The response ended: after the final ack this is the normal end (nobody
                // watches any more); before it, the recorder gave up on the recording.
                let _ = failed.send(Some("recorder ended the recording".to_owned()));
                return;
            }
            Ok(Some(Err(e))) => {
                let _ = failed.send(Some(format!("recorder connection failed: {e}")));
                return;
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = memchr::memchr(b'\n', &buf) {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                let _ = failed.send(Some("recorder sent a malformed ack".to_owned()));
                return;
            };
            if let Some(n) = v.get("ack").and_then(Value::as_u64) {
                acked.send_if_modified(|a| {
                    let raised = n > *a;
                    *a = (*a).max(n);
                    raised
                });
            }
            if let Some(e) = v.get("error").and_then(Value::as_str) {
                let _ = failed.send(Some(format!("recorder failed: {e}")));
                return;
            }
        }
    }
}

impl Recording {
    async fn send(&mut self, bytes: BytesMut) -> Result<(), String> {
        if let Some(reason) = self.failed.borrow().clone() {
            return Err(reason);
        }
        let tx = self.tx.as_ref().ok_or("recording already ended")?;
        let n = bytes.len() as u64;
        tx.send(bytes)
            .await
            .map_err(|_| "recorder connection closed".to_owned())?;
        self.sent += n;
        Ok(())
    }

    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    async fn event(&mut self, code: &str, data: &str) -> Result<(), String> {
        let line = self.line(round6(self.elapsed()), code, data);
        self.send(line).await
    }

    /// Terminal output (`o`).
    ///
    /// # Errors
    /// The recording failed.
    pub async fn output(&mut self, bytes: &[u8]) -> Result<(), String> {
        let time = round6(self.started.elapsed().as_secs_f64());
        let text = self.utf8.decode(bytes);
        if text.is_empty() {
            return Ok(());
        }
        let needed = json_string_room(text.len()) + 32;
        if self.lines.capacity() < needed {
            self.lines = BytesMut::with_capacity(LINES_BYTES.max(needed));
        }
        write_event_line(&mut self.lines, time, "o", &text);
        let line = self.lines.split();
        self.send(line).await
    }

    /// One event line, split off [`Recording::lines`].
    fn line(&mut self, time: f64, code: &str, data: &str) -> BytesMut {
        write_event_line(&mut self.lines, time, code, data);
        self.lines.split()
    }

    /// Input (`i`), when the policy records it.
    ///
    /// # Errors
    /// The recording failed.
    pub async fn input(&mut self, bytes: &[u8]) -> Result<(), String> {
        if !self.record_input {
            return Ok(());
        }
        self.event("i", &String::from_utf8_lossy(bytes)).await
    }

    /// A terminal resize (`r`, `COLSxROWS`).
    ///
    /// # Errors
    /// The recording failed.
    pub async fn resize(&mut self, cols: u32, rows: u32) -> Result<(), String> {
        self.event("r", &format!("{cols}x{rows}")).await
    }

    /// Resolves once the recording has failed, with the reason.
    pub async fn failure(&mut self) -> String {
        loop {
            if let Some(reason) = self.failed.borrow().clone() {
                return reason;
            }
            if self.failed.changed().await.is_err() {
                return "recorder connection closed".to_owned();
            }
        }
    }

    /// Ends the body and waits for the recorder to ack everything sent.
    ///
    /// # Errors
    /// The recording failed or the final ack did not come in time.
    pub async fn finish(mut self) -> Result<(), String> {
        let tail = self.utf8.flush();
        if !tail.is_empty() {
            self.event("o", &tail).await?;
        }
        self.tx.take();
        let sent = self.sent;
        let mut acked = self.acked.clone();
        let done = tokio::time::timeout(FINAL_ACK_WAIT, acked.wait_for(|&a| a >= sent)).await;
        match done {
            Ok(Ok(_)) => Ok(()),
            _ => Err(self
                .failed
                .borrow()
                .clone()
                .unwrap_or_else(|| "recorder did not ack the end of the recording".to_owned())),
        }
    }
}

fn round6(t: f64) -> f64 {
    (t * 1e6).round() / 1e6
}

/// Turns a byte stream into text without splitting a UTF-8 sequence across events: an
/// incomplete sequence at the end of a read waits for the next; invalid bytes become U+FFFD
/// (as Go's JSON encoding of Tailscale's recorder does).
#[derive(Debug, Default)]
pub struct Utf8Carry {
    pending: Vec<u8>,
}

impl Utf8Carry {
    /// The text of `bytes` up to the last complete character; borrowed when nothing was
    /// pending and the bytes are valid UTF-8 (the usual case).
    pub fn decode<'a>(&mut self, bytes: &'a [u8]) -> std::borrow::Cow<'a, str> {
        if self.pending.is_empty() {
            let keep = incomplete_tail(bytes);
            let (text, tail) = bytes.split_at(bytes.len() - keep);
            self.pending.extend_from_slice(tail);
            return lossy(text);
        }
        self.pending.extend_from_slice(bytes);
        let keep = incomplete_tail(&self.pending);
        let cut = self.pending.len() - keep;
        let text = lossy(&self.pending[..cut]).into_owned();
        self.pending.drain(..cut);
        std::borrow::Cow::Owned(text)
    }

    pub fn flush(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// `bytes` as text, invalid sequences replaced. Valid input (nearly all terminal output) goes
/// through `str::from_utf8`, which checks a word at a time; `from_utf8_lossy` walks it
/// character by character and was about 7% of the gateway's CPU under `cat`.
fn lossy(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// Appends one asciicast event line, `[time, code, data]\n`, to `out`.
fn write_event_line(out: &mut BytesMut, time: f64, code: &str, data: &str) {
    use std::fmt::Write as _;
    out.reserve(json_string_room(data.len()) + 32);
    let _ = write!(out, "[{time},\"{code}\",");
    push_json_string(out, data);
    out.put_slice(b"]\n");
}

/// Bytes of text looked at together by [`push_json_string`]: one bit each in a `u64` mask.
const ESCAPE_BLOCK: usize = 64;
/// A plain run up to this long is copied with one fixed-size copy (cut back to its length);
/// longer ones with a copy of their own length. On the gateway bench's text, 64 ran at
/// 1.73 GB/s and 128 at 1.62 GB/s.
const ESCAPE_RUN: usize = 64;

/// Room [`push_json_string`] sets aside for `len` bytes of text: a quarter more for escapes
/// and a block's overshoot; it grows when escapes need more.
const fn json_string_room(len: usize) -> usize {
    len + len / 4 + 2 * (ESCAPE_BLOCK + ESCAPE_RUN)
}

/// Appends `text` as a JSON string. Terminal output is plain text with a byte to escape every
/// 20 or so bytes (escape sequences, line ends), so the work per escape is what counts:
/// - each block of 64 bytes gets one mask of its bytes to escape, computed eight bytes at a
///   time;
/// - for each set bit the plain run before it is copied with one fixed-size copy, and the
///   escape (from a table) with another, each cut back to its length;
/// - the output goes into a zero-filled slice indexed by a local offset, not through
///   `BytesMut::put_slice`, whose length field made each escape wait on memory.
///
/// On the gateway bench's text in 32 KiB reads this runs at 1.73 GB/s, against 1.22 GB/s for
/// the word-at-a-time escaper before it (same run), and serde_json's byte-at-a-time escaper
/// was a quarter of the gateway's CPU.
fn push_json_string(out: &mut BytesMut, text: &str) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const LOWS: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    /// One bit per byte of `w` (bit k for byte k, little-endian) below 0x20, a quote or a
    /// backslash. Exact: no carry crosses a byte.
    fn special(w: u64) -> u64 {
        let zero = |y: u64| !(((y & LOWS) + LOWS) | y) & HIGHS;
        let below_space = !(((w & LOWS) + ONES * 0x60) | w) & HIGHS;
        let m =
            below_space | zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\')));
        // The high bits, gathered into the low byte.
        (m >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56
    }
    // Most a block can write: six bytes per byte, a run waiting from before it and the
    // overshoot of the fixed-size copies.
    const BLOCK_MAX: usize = 6 * ESCAPE_BLOCK + 2 * ESCAPE_RUN;
    let bytes = text.as_bytes();
    let start = out.len();
    let mut room = json_string_room(bytes.len());
    out.resize(start + room, 0);
    let mut dst = &mut out[start..];
    dst[0] = b'"';
    let mut o = 1;
    // Start of the plain run not yet copied.
    let mut from = 0;
    let mut i = 0;
    while i + ESCAPE_BLOCK + ESCAPE_RUN <= bytes.len() {
        if o + BLOCK_MAX > room {
            room += room / 2 + BLOCK_MAX;
            out.resize(start + room, 0);
            dst = &mut out[start..];
        }
        let mut mask = 0u64;
        for (k, w) in bytes[i..i + ESCAPE_BLOCK].chunks_exact(8).enumerate() {
            let w = [w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]];
            mask |= special(u64::from_le_bytes(w)) << (8 * k);
        }
        while mask != 0 {
            let at = i + mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let run = at - from;
            if run <= ESCAPE_RUN {
                // In bounds: `from + ESCAPE_RUN <= at + ESCAPE_RUN < i + ESCAPE_BLOCK + ESCAPE_RUN`.
                dst[o..o + ESCAPE_RUN].copy_from_slice(&bytes[from..from + ESCAPE_RUN]);
            } else {
                if o + run + BLOCK_MAX > room {
                    room = o + run + BLOCK_MAX + room / 2;
                    out.resize(start + room, 0);
                    dst = &mut out[start..];
                }
                dst[o..o + run].copy_from_slice(&bytes[from..at]);
            }
            o += run;
            let (escape, len) = &ESCAPES[usize::from(bytes[at])];
            dst[o..o + 8].copy_from_slice(escape);
            o += usize::from(*len);
            from = at + 1;
        }
        i += ESCAPE_BLOCK;
    }
    out.truncate(start + o);
    out.put_slice(&bytes[from..i]);
    for &b in &bytes[i..] {
        match ESCAPES[usize::from(b)] {
            (_, 0) => out.put_u8(b),
            (escape, len) => out.put_slice(&escape[..usize::from(len)]),
        }
    }
    out.put_u8(b'"');
}

/// Each byte's JSON escape, padded to eight bytes, and its length (0: the byte as it is).
static ESCAPES: [([u8; 8], u8); 256] = escapes();

const fn escapes() -> [([u8; 8], u8); 256] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut table = [([0u8; 8], 0u8); 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = (
            [b'\\', b'u', b'0', b'0', HEX[b >> 4], HEX[b & 0xf], 0, 0],
            6,
        );
        b += 1;
    }
    let short: [(u8, u8); 7] = [
        (b'"', b'"'),
        (b'\\', b'\\'),
        (b'\n', b'n'),
        (b'\r', b'r'),
        (b'\t', b't'),
        (0x08, b'b'),
        (0x0c, b'f'),
    ];
    let mut k = 0;
    while k < short.len() {
        table[short[k].0 as usize] = ([b'\\', short[k].1, 0, 0, 0, 0, 0, 0], 2);
        k += 1;
    }
    table
}

/// Length of a UTF-8 sequence begun but not finished at the end of `bytes` (0 to 3).
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=3.min(bytes.len()) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue;
        }
        let need = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return 0,
        };
        return if need > back { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_are_json() {
        for text in [
            "",
            "plain ascii text over eight",
            "a\"b\\c\n\r\t\u{1b}[0m\u{7f}☃\u{0}x",
            "12345678\u{1b}",
        ] {
            let mut line = BytesMut::new();
            write_event_line(&mut line, 1.5, "o", text);
            assert_eq!(line.last(), Some(&b'\n'));
            let v: (f64, String, String) = serde_json::from_slice(&line).unwrap();
            assert_eq!(v, (1.5, "o".to_owned(), text.to_owned()));
        }
    }

    /// Every byte that needs escaping, at every position in and across eight-byte words and
    /// 64-byte blocks, in the bytewise tail and after a run longer than the fixed-size copy,
    /// next to non-ASCII text: the same string serde_json writes.
    #[test]
    fn json_strings_match_serde_json() {
        let specials: Vec<char> = (0u8..0x20)
            .map(char::from)
            .chain(['"', '\\', '\u{7f}', 'é', '☃', '🎉', 'a'])
            .collect();
        for &c in &specials {
            for &d in &specials {
                for at in (0..18).chain(56..74).chain(120..140) {
                    // Short: the bytewise tail; long: the blocks.
                    for tail in [0, 200] {
                        let mut text: String = "x".repeat(at);
                        text.push(c);
                        text.push_str("0123456");
                        text.push(d);
                        text.push_str(&"t".repeat(tail));
                        let mut out = BytesMut::new();
                        push_json_string(&mut out, &text);
                        assert_eq!(out[..], serde_json::to_vec(&text).unwrap(), "{text:?}");
                    }
                }
            }
        }
    }

    /// Long texts of every mix, from all plain (one long run) to all escapes (the room grows
    /// several times), with runs around the fixed-size copy's length.
    #[test]
    fn long_json_strings_match_serde_json() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for escape_one_in in [1, 2, 3, 20, 63, 64, 65, 200, 100_000] {
            for len in [0, 1, 127, 128, 129, 1000, 40_000] {
                let text: String = (0..len)
                    .map(|_| match next() % escape_one_in {
                        0 => ['\u{1b}', '\n', '"', '\\', '\u{0}'][(next() % 5) as usize],
                        1 if escape_one_in > 2 => 'é',
                        _ => char::from(b'a' + (next() % 26) as u8),
                    })
                    .collect();
                let mut out = BytesMut::from(&b"prefix"[..]);
                push_json_string(&mut out, &text);
                assert_eq!(out[..6], b"prefix"[..]);
                assert_eq!(
                    out[6..],
                    serde_json::to_vec(&text).unwrap(),
                    "1 in {escape_one_in}, {len} chars"
                );
            }
        }
    }

    /// Lines split off one buffer join without a copy; a line from another buffer does not
    /// count as adjacent.
    #[test]
    fn lines_of_one_buffer_are_adjacent() {
        let mut lines = BytesMut::with_capacity(1024);
        write_event_line(&mut lines, 0.5, "o", "first");
        let first = lines.split();
        write_event_line(&mut lines, 0.6, "o", "second");
        let second = lines.split();
        assert!(adjacent(&first, &second));
        let mut other = BytesMut::with_capacity(1024);
        write_event_line(&mut other, 0.7, "o", "third");
        assert!(!adjacent(&second, &other.split()));
        let mut frame = first;
        frame.unsplit(second);
        assert!(frame.ends_with(b"\"second\"]\n"));
    }

    #[test]
    fn utf8_split_across_reads() {
        let mut c = Utf8Carry::default();
        let snowman = "☃".as_bytes();
        assert_eq!(c.decode(&[b'a', snowman[0]]), "a");
        assert_eq!(c.decode(&snowman[1..2]), "");
        assert_eq!(c.decode(&[snowman[2], b'b']), "☃b");
        assert_eq!(c.decode(&[0xff, b'c']), "\u{fffd}c");
        assert_eq!(c.decode(&[0xe2]), "");
        assert_eq!(c.flush(), "\u{fffd}");
    }
}
