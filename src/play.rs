//! `castvault play ID`: a recording in the terminal, like `asciinema play`, read straight from
//! the store one chunk at a time (the next chunk is fetched while the current one plays, and
//! each is checked against the manifest's digest before a byte of it is shown).
//!
//! Keys (when stdin is a terminal, which is put in raw mode and restored on exit, SIGTERM and
//! SIGHUP included): space pauses
//! and resumes; `.` shows the next event while paused; right and left arrows jump to the start
//! of the next and previous chunk; `q` or Ctrl-C quits. A jump rebuilds the screen from the
//! indexer's snapshot at that chunk when the recording is indexed, else by writing out every
//! earlier chunk's output at once.
//!
//! Timing: the pause before each output event is the recording's, cut to the idle-time limit
//! (`-i`, else the header's `idle_time_limit`), divided by the speed.

use std::io::Write as _;
use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use castvault_storage::keys::RecordingId;
use castvault_storage::manifest::Manifest;
use castvault_storage::reader;
use castvault_storage::store::DynStore;
use tokio::sync::mpsc;

use crate::config::Config;

/// Keys waiting to be handled; typing faster than this is dropped.
const KEY_QUEUE: usize = 64;

/// Longest wait between two events at any speed (a recording with a bad time would otherwise
/// stall the player for ever).
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

pub struct Options {
    pub speed: f64,
    pub idle_time_limit: Option<f64>,
    pub from_chunk: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Pause,
    Step,
    Next,
    Previous,
    Quit,
}

/// Puts the terminal in raw mode while alive.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enter() -> Option<Self> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use nix::sys::termios::{SetArg, tcsetattr};
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// Reads keys from stdin on a thread of its own (a blocking read cannot be cancelled; the
/// thread ends with the process).
fn read_keys() -> mpsc::Receiver<Key> {
    let (tx, rx) = mpsc::channel(KEY_QUEUE);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 64];
        let mut escape = Vec::new();
        loop {
            let n = match std::io::Read::read(&mut stdin, &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            for &b in &buf[..n] {
                let key = if !escape.is_empty() {
                    escape.push(b);
                    match escape.as_slice() {
                        [0x1b] | [0x1b, b'['] | [0x1b, b'O'] => continue,
                        [0x1b, b'[' | b'O', b'C'] => Some(Key::Next),
                        [0x1b, b'[' | b'O', b'D'] => Some(Key::Previous),
                        _ => None,
                    }
                } else {
                    match b {
                        0x1b => {
                            escape.push(b);
                            continue;
                        }
                        b' ' => Some(Key::Pause),
                        b'.' => Some(Key::Step),
                        b'q' | 0x03 => Some(Key::Quit),
                        _ => None,
                    }
                };
                escape.clear();
                if let Some(key) = key
                    && tx.try_send(key).is_err()
                    && tx.is_closed()
                {
                    return;
                }
            }
        }
    });
    rx
}

/// One output event: its time and text.
struct Output {
    time: f64,
    data: String,
}

/// The output events of a chunk (input, resize and marker events are not shown).
fn outputs(raw: &[u8], skip_header: bool) -> Vec<Output> {
    let mut lines = raw.split(|&b| b == b'\n');
    if skip_header {
        lines.next();
    }
    lines
        .filter_map(|line| serde_json::from_slice::<(f64, String, String)>(line).ok())
        .filter(|(time, code, _)| code == "o" && time.is_finite())
        .map(|(time, _, data)| Output { time, data })
        .collect()
}

struct Player {
    store: DynStore,
    id: RecordingId,
    manifest: Manifest,
    index: Option<crate::indexer::Index>,
    out: std::io::Stdout,
}

impl Player {
    async fn chunk(&self, seq: u32) -> anyhow::Result<Bytes> {
        let entry = self
            .manifest
            .chunks
            .get(seq as usize)
            .with_context(|| format!("no chunk {seq}"))?;
        let (raw, _) = reader::read_chunk(self.store.as_ref(), &self.id, entry)
            .await
            .with_context(|| format!("reading chunk {seq}"))?;
        Ok(raw)
    }

    fn write(&mut self, text: &str) -> anyhow::Result<()> {
        self.out.write_all(text.as_bytes())?;
        self.out.flush()?;
        Ok(())
    }

    /// Rebuilds the screen as it was at the start of chunk `seq`.
    async fn seek(&mut self, seq: u32) -> anyhow::Result<()> {
        let snapshot = self.index.as_ref().and_then(|i| {
            i.snapshots
                .iter()
                .find(|s| s.seq == seq && s.offset == self.manifest.chunks[seq as usize].offset)
                .cloned()
        });
        // RIS: a fresh terminal, as the snapshot (or chunk 0) expects.
        self.write("\x1bc")?;
        if let Some(snapshot) = snapshot {
            return self.write(&snapshot.init);
        }
        for earlier in 0..seq {
            let raw = self.chunk(earlier).await?;
            let text: String = outputs(&raw, earlier == 0)
                .into_iter()
                .map(|o| o.data)
                .collect();
            self.write(&text)?;
        }
        Ok(())
    }
}

/// `castvault play`.
///
/// # Errors
/// Unknown recording, unreadable or corrupt chunk, or a closed terminal.
pub async fn run(cfg: &Config, id: &str, options: Options) -> anyhow::Result<()> {
    if !(options.speed.is_finite() && options.speed > 0.0) {
        anyhow::bail!("--speed must be a positive number");
    }
    if options
        .idle_time_limit
        .is_some_and(|l| !(l.is_finite() && l > 0.0))
    {
        anyhow::bail!("--idle-time-limit must be a positive number of seconds");
    }
    let id = RecordingId::parse(id).map_err(|e| anyhow::anyhow!("{e}"))?;
    let stores = cfg.open_stores().map_err(anyhow::Error::msg)?;
    let store = stores.for_id(&id)?.clone();
    let manifest = match reader::read_manifest(store.as_ref(), &id).await {
        Err(reader::ReadError::NotFound { .. }) => anyhow::bail!(
            "recording {id} has no manifest: it is still being recorded (watch it live in the web UI) or does not exist"
        ),
        other => other?,
    };
    let chunks = manifest.chunks.len() as u32;
    if chunks == 0 {
        return Ok(());
    }
    if options.from_chunk >= chunks {
        anyhow::bail!(
            "--from-chunk {}: the recording has {chunks} chunks",
            options.from_chunk
        );
    }
    let idle_limit = options.idle_time_limit.or_else(|| {
        manifest
            .header
            .get("idle_time_limit")
            .and_then(serde_json::Value::as_f64)
            .filter(|l| l.is_finite() && *l > 0.0)
    });
    let index = crate::indexer::read_index(&store, &id).await.ok().flatten();
    let mut player = Player {
        store,
        id,
        manifest,
        index,
        out: std::io::stdout(),
    };
    let raw_mode = std::io::IsTerminal::is_terminal(&std::io::stdin())
        .then(RawMode::enter)
        .flatten();
    let mut keys = if raw_mode.is_some() {
        read_keys()
    } else {
        // No keys: a channel closed at once (its sender is dropped here).
        mpsc::channel(1).1
    };
    // SIGTERM and SIGHUP end playback the way `q` does, so the terminal is restored.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let result = tokio::select! {
        result = play(&mut player, &mut keys, &options, idle_limit) => result,
        _ = term.recv() => Ok(()),
        _ = hangup.recv() => Ok(()),
    };
    drop(raw_mode);
    result
}

async fn play(
    player: &mut Player,
    keys: &mut mpsc::Receiver<Key>,
    options: &Options,
    idle_limit: Option<f64>,
) -> anyhow::Result<()> {
    let chunks = player.manifest.chunks.len() as u32;
    let mut seq = options.from_chunk;
    // The time of the event shown last; `None` after a jump, so the chunk's first event shows
    // at once.
    let mut last_time = Some(0.0);
    if seq > 0 {
        player.seek(seq).await?;
        last_time = None;
    }
    // The chunk on screen: that of the event shown last, or the one jumped to. Jumps are
    // relative to it (while a pause runs on to the next chunk's first event, the screen still
    // shows the earlier one).
    let mut shown = seq;
    let mut paused = false;
    let mut keys_open = true;
    let mut prefetched: Option<(u32, Prefetch)> = None;
    'chunks: while seq < chunks {
        let raw = match prefetched.take() {
            Some((at, fetch)) if at == seq => {
                fetch
                    .await
                    .context("chunk task")?
                    .with_context(|| format!("reading chunk {seq}"))?
                    .0
            }
            other => {
                if let Some((_, fetch)) = other {
                    fetch.abort();
                }
                player.chunk(seq).await?
            }
        };
        // The next chunk is fetched while this one plays.
        if seq + 1 < chunks {
            let (store, id, entry) = (
                player.store.clone(),
                player.id.clone(),
                player.manifest.chunks[seq as usize + 1].clone(),
            );
            let fetch =
                tokio::spawn(async move { reader::read_chunk(store.as_ref(), &id, &entry).await });
            prefetched = Some((seq + 1, fetch));
        }
        for event in outputs(&raw, seq == 0) {
            let mut gap = last_time.map_or(0.0, |last| (event.time - last).max(0.0));
            if let Some(limit) = idle_limit {
                gap = gap.min(limit);
            }
            let wait = Duration::try_from_secs_f64(gap / options.speed)
                .unwrap_or(MAX_WAIT)
                .min(MAX_WAIT);
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            loop {
                let key = tokio::select! {
                    () = &mut sleep, if !paused => break,
                    key = keys.recv(), if keys_open => key,
                };
                match key {
                    None => {
                        keys_open = false;
                        if paused {
                            // Nothing can resume it.
                            return Ok(());
                        }
                    }
                    Some(Key::Quit) => return Ok(()),
                    Some(Key::Pause) => paused = !paused,
                    Some(Key::Step) if paused => break,
                    Some(key @ (Key::Next | Key::Previous)) => {
                        let target = match key {
                            Key::Next => shown + 1,
                            _ => shown.saturating_sub(1),
                        };
                        if target >= chunks {
                            continue;
                        }
                        seq = target;
                        shown = target;
                        player.seek(seq).await?;
                        last_time = None;
                        continue 'chunks;
                    }
                    Some(Key::Step) => {}
                }
            }
            player.write(&event.data)?;
            last_time = Some(event.time);
            shown = seq;
        }
        seq += 1;
    }
    Ok(())
}

type Prefetch = tokio::task::JoinHandle<Result<(Bytes, [u8; 32]), reader::ReadError>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_output_events_are_shown() {
        let raw = b"{\"version\":2}\n[0.5,\"o\",\"hi\"]\n[0.6,\"i\",\"x\"]\n[0.7,\"r\",\"80x24\"]\nnot json\n[1.0,\"o\",\"\\u001b[1m\"]";
        let out = outputs(raw, true);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].data, "hi");
        assert_eq!(out[1].data, "\u{1b}[1m");
        assert_eq!(out[1].time, 1.0);
    }
}
