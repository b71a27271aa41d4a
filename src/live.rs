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
//! The data file is read through a [`Tail`], whose handle stays valid after the recording is
//! finalized and its spool directory removed. Lines over 8 MiB are not sent live.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use castvault_storage::keys::RecordingId;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;

use crate::indexer::Replay;
use crate::spool::Tail;
use crate::upload::LiveSource;

/// How often the follower looks for new bytes when no commit woke it; bounds the added
/// latency of the live view well under its 1 s target.
const LIVE_POLL: Duration = Duration::from_millis(100);

/// Messages queued for one viewer; a viewer that reads slower than this waits the follower
/// (which only reads the file), never the recording.
const LIVE_QUEUE: usize = 64;

/// Starts following `source`; the returned stream is the SSE response body.
pub fn follow(
    id: RecordingId,
    source: LiveSource,
    tail: Tail,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel(LIVE_QUEUE);
    tokio::spawn(async move {
        if let Err(e) = run(&source, tail, &tx).await {
            tracing::debug!(recording_id = %id, error = %e, "live view ended");
        }
    });
    Sse::new(crate::playback::tokio_stream_from(rx).map(Ok)).keep_alive(KeepAlive::default())
}

async fn run(
    source: &LiveSource,
    mut tail: Tail,
    tx: &mpsc::Sender<Event>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut durable = source.file().durable();
    // Catch up: replay everything written so far into a terminal.
    let mut replay = Replay::new()?;
    let caught_up = source.file().written();
    while let Some(lines) = tail.next_lines(caught_up).await? {
        replay = tokio::task::spawn_blocking(move || {
            replay.feed(&lines);
            replay.lines.clear();
            replay
        })
        .await?;
    }
    let start = replay.snapshot(0, tail.offset());
    let reset =
        json!({ "cols": start.cols, "rows": start.rows, "time": start.time, "init": start.init });
    tx.send(Event::default().data(reset.to_string())).await?;
    drop(replay);

    // Follow: every whole line from the same offset on.
    let mut header_seen = tail.offset() > 0;
    loop {
        if let Some(lines) = tail.next_lines(source.file().written()).await? {
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
            continue;
        }
        if source.ended() && source.file().written() <= tail.offset() {
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
