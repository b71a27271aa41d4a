//! Live view: follows a recording this node is receiving, as server-sent events in the format
//! asciinema-player's `eventsource` driver reads.
//!
//! The stream opens with one reset message, `{"cols","rows","time","init"}`, whose `init`
//! paints the screen as the bytes received so far left it (replayed from the spool's data
//! file), then sends every later event line, `[time, code, data]`, from the same file offset
//! on: what was shown and what follows meet at one byte offset, so nothing is missed or sent
//! twice. Only whole lines are sent. When the stream has ended and its last byte is sent, a
//! `done` event closes it.
//!
//! The data file is read through one open handle, which stays valid after the recording is
//! finalized and its spool directory removed.

use std::convert::Infallible;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use castvault_storage::keys::RecordingId;
use serde_json::json;
use tokio::sync::mpsc;

use crate::indexer::Replay;
use crate::upload::LiveSource;

/// How often the follower looks for new bytes when no commit woke it; bounds the added
/// latency of the live view well under its 1 s target.
const LIVE_POLL: Duration = Duration::from_millis(100);

/// Bytes read from the data file at once (catch-up and follow alike).
const LIVE_READ_BYTES: usize = 1 << 20;

/// Messages queued for one viewer; a viewer that reads slower than this waits the follower
/// (which only reads the file), never the recording.
const LIVE_QUEUE: usize = 64;

/// Lines longer than this are not sent live (the player could not draw them usefully); they
/// are in the recording and its playback. Bounds the follower's carry buffer.
const LIVE_MAX_LINE: usize = 8 << 20;

/// Starts following `source`; the returned stream is the SSE response body.
pub fn follow(
    id: RecordingId,
    source: LiveSource,
    file: File,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel(LIVE_QUEUE);
    tokio::spawn(async move {
        if let Err(e) = run(&source, Arc::new(file), &tx).await {
            tracing::debug!(recording_id = %id, error = %e, "live view ended");
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event| (Ok(event), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn read(file: &Arc<File>, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0; len];
        let n = file.read_at(&mut buf, offset)?;
        buf.truncate(n);
        Ok(buf)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Splits off the whole lines at the front of `carry` (through its last newline).
fn whole_lines(carry: &mut Vec<u8>) -> Option<Vec<u8>> {
    let end = carry.iter().rposition(|&b| b == b'\n')? + 1;
    let rest = carry.split_off(end);
    Some(std::mem::replace(carry, rest))
}

async fn run(
    source: &LiveSource,
    file: Arc<File>,
    tx: &mpsc::Sender<Event>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut durable = source.file().durable();
    // Catch up: replay everything written so far into a terminal.
    let mut replay = Replay::new()?;
    let mut offset = 0u64;
    let mut carry = Vec::new();
    let caught_up = source.file().written();
    while offset < caught_up {
        let want = usize::try_from(caught_up - offset)
            .unwrap_or(usize::MAX)
            .min(LIVE_READ_BYTES);
        let bytes = read(&file, offset, want).await?;
        if bytes.is_empty() {
            break;
        }
        offset += bytes.len() as u64;
        carry.extend_from_slice(&bytes);
        if let Some(lines) = whole_lines(&mut carry) {
            replay = tokio::task::spawn_blocking(move || {
                replay.feed(&lines);
                replay.lines.clear();
                replay
            })
            .await?;
        }
        if carry.len() > LIVE_MAX_LINE {
            carry.clear();
        }
    }
    let start = replay.snapshot(0, offset);
    let reset =
        json!({ "cols": start.cols, "rows": start.rows, "time": start.time, "init": start.init });
    tx.send(Event::default().data(reset.to_string())).await?;
    drop(replay);

    // Follow: every whole line from the same offset on.
    let mut header_seen = offset > 0;
    loop {
        let written = source.file().written();
        if written > offset {
            let want = usize::try_from(written - offset)
                .unwrap_or(usize::MAX)
                .min(LIVE_READ_BYTES);
            let bytes = read(&file, offset, want).await?;
            offset += bytes.len() as u64;
            carry.extend_from_slice(&bytes);
            if let Some(lines) = whole_lines(&mut carry) {
                for line in lines.split(|&b| b == b'\n') {
                    let line = line.trim_ascii();
                    if line.is_empty() {
                        continue;
                    }
                    if !header_seen {
                        header_seen = true;
                        continue;
                    }
                    let Ok((t, code, data)) =
                        serde_json::from_slice::<(f64, String, serde_json::Value)>(line)
                    else {
                        continue;
                    };
                    if !matches!(code.as_str(), "o" | "r" | "m") {
                        continue;
                    }
                    let event = json!([t, code, data]).to_string();
                    tx.send(Event::default().data(event)).await?;
                }
            }
            if carry.len() > LIVE_MAX_LINE {
                carry.clear();
            }
            continue;
        }
        if source.ended() && source.file().written() <= offset {
            tx.send(Event::default().event("done").data("{}")).await?;
            return Ok(());
        }
        tokio::select! {
            () = tx.closed() => return Ok(()),
            _ = durable.changed() => {}
            () = tokio::time::sleep(LIVE_POLL) => {}
        }
    }
}
