//! One proxied session: the client's requests (PTY, shell or exec, window changes, signals,
//! data, EOF) go to the target's sshd over the gateway's own connection; the target's output,
//! exit status and EOF come back; output, resizes and (by policy) input are recorded.
//!
//! Failure policy, as Tailscale SSH applies it: if no recorder accepts the session it is refused
//! with a message (`on_recorder_unavailable = "reject"`) or runs unrecorded ("allow"); if the
//! recording fails mid-session the session ends with a message ("terminate") or goes on
//! unrecorded ("continue"). Subsystems (SFTP, and so modern `scp`) and legacy `scp` commands are
//! refused with a message: file transfers would not be recorded.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use russh::keys::PrivateKeyWithHashAlg;
use russh::server::{Handle, Msg};
use russh::{Channel, ChannelId, ChannelMsg};
use serde_json::{Map, Value, json};

use super::recording::{self, Recording};
use super::{FailurePolicy, Gateway, Login, StartPolicy, split_host_port};

/// Exit status sent when the gateway ends a session itself (as OpenSSH does for its errors).
const GATEWAY_EXIT: u32 = 255;

pub struct Session {
    pub gateway: Arc<Gateway>,
    pub login: Login,
    pub peer: SocketAddr,
    pub handle: Handle,
}

/// What the client asked for before the session starts.
#[derive(Default)]
struct Requested {
    pty: Option<Pty>,
    command: Option<String>,
}

struct Pty {
    term: String,
    cols: u32,
    rows: u32,
    px_w: u32,
    px_h: u32,
    modes: Vec<(russh::Pty, u32)>,
}

/// The target's host key check: pinned in known_hosts, else refused with the reason kept.
struct Onward {
    host: String,
    port: u16,
    known_hosts: std::path::PathBuf,
    refusal: Arc<Mutex<Option<String>>>,
}

impl russh::client::Handler for Onward {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            *self
                .refusal
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some("target presented a host certificate; pin its key in known_hosts".into());
            return Ok(false);
        };
        let verdict = match russh::keys::check_known_hosts_path(
            &self.host,
            self.port,
            key,
            &self.known_hosts,
        ) {
            Ok(true) => return Ok(true),
            Ok(false) => format!(
                "target host key for {}:{} is not in the gateway's known_hosts",
                self.host, self.port
            ),
            Err(russh::keys::Error::KeyChanged { line }) => format!(
                "TARGET HOST KEY CHANGED for {}:{} (known_hosts line {line}); refusing",
                self.host, self.port
            ),
            Err(e) => format!("cannot check the target host key: {e}"),
        };
        *self
            .refusal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(verdict);
        Ok(false)
    }
}

impl Session {
    async fn reply(&self, id: ChannelId, want_reply: bool, ok: bool) {
        if want_reply {
            let _ = if ok {
                self.handle.channel_success(id).await
            } else {
                self.handle.channel_failure(id).await
            };
        }
    }

    /// Tells the user why the session ends, then ends it.
    async fn refuse(&self, id: ChannelId, message: &str) {
        tracing::info!(peer = %self.peer, user = %self.login.gateway_user, target = %self.login.target, %message, "gateway session refused");
        let text = format!("castvault gateway: {message}\r\n");
        let _ = self.handle.extended_data(id, 1, text.into_bytes()).await;
        let _ = self.handle.exit_status_request(id, GATEWAY_EXIT).await;
        let _ = self.handle.eof(id).await;
        let _ = self.handle.close(id).await;
    }

    pub async fn run(self, channel: Channel<Msg>) {
        let id = channel.id();
        let (mut from_client, to_client) = channel.split();
        // Phase 1: the client's requests until it asks for a shell or a command.
        let mut req = Requested::default();
        loop {
            match from_client.wait().await {
                Some(ChannelMsg::RequestPty {
                    want_reply,
                    term,
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                    terminal_modes,
                }) => {
                    req.pty = Some(Pty {
                        term,
                        cols: col_width,
                        rows: row_height,
                        px_w: pix_width,
                        px_h: pix_height,
                        modes: terminal_modes,
                    });
                    self.reply(id, want_reply, true).await;
                }
                Some(ChannelMsg::RequestShell { want_reply }) => {
                    self.reply(id, want_reply, true).await;
                    break;
                }
                Some(ChannelMsg::Exec {
                    want_reply,
                    command,
                }) => {
                    let command = String::from_utf8_lossy(&command).into_owned();
                    let first = command.split_whitespace().next().unwrap_or_default();
                    if first == "scp" || first.ends_with("/scp") {
                        self.reply(id, want_reply, false).await;
                        self.refuse(id, "scp is refused by policy: file transfers through the gateway are not recorded").await;
                        return;
                    }
                    req.command = Some(command);
                    self.reply(id, want_reply, true).await;
                    break;
                }
                Some(ChannelMsg::RequestSubsystem { want_reply, name }) => {
                    self.reply(id, want_reply, false).await;
                    self.refuse(id, &format!("subsystem {name:?} is refused by policy: file transfers through the gateway are not recorded")).await;
                    return;
                }
                // russh marks every request `want_reply` in these messages, and sends a reply
                // for whichever request came last: `env` (sent without wanting one) must not be
                // answered, or OpenSSH takes it as the answer to its `exec`. russh itself
                // refuses agent forwarding.
                Some(ChannelMsg::SetEnv { .. } | ChannelMsg::AgentForward { .. }) => {}
                Some(ChannelMsg::RequestX11 { want_reply, .. }) => {
                    self.reply(id, want_reply, false).await;
                }
                Some(ChannelMsg::Eof | ChannelMsg::Close) | None => return,
                Some(_) => {}
            }
        }

        let Some(target) = self.gateway.config.targets.get(&self.login.target).cloned() else {
            self.refuse(id, &format!("unknown target {:?}", self.login.target))
                .await;
            return;
        };
        let onward_user = target
            .user
            .clone()
            .unwrap_or_else(|| self.login.gateway_user.clone());

        // Phase 2: the recording, then the onward connection.
        let header = self.header(&req, &onward_user, &target.address);
        let token = self
            .gateway
            .config
            .recorder_token
            .as_ref()
            .map(|t| t.expose().to_owned());
        let mut rec = match recording::start(
            &self.gateway.config.recorders,
            token.as_deref(),
            &header,
            self.gateway.config.record_input,
        )
        .await
        {
            Ok(rec) => Some(rec),
            Err(attempts) => match self.gateway.config.on_recorder_unavailable {
                StartPolicy::Reject => {
                    self.refuse(
                        id,
                        &format!(
                            "session refused: no recorder accepted the recording ({})",
                            attempts.join("; ")
                        ),
                    )
                    .await;
                    return;
                }
                StartPolicy::Allow => {
                    tracing::warn!(user = %self.login.gateway_user, target = %self.login.target, attempts = %attempts.join("; "), "gateway session unrecorded: no recorder");
                    let _ = self.handle.extended_data(id, 1, b"castvault gateway: warning: this session is NOT recorded (no recorder available)\r\n".to_vec()).await;
                    None
                }
            },
        };
        let target_channel = match self.connect(&target, &onward_user).await {
            Ok(ch) => ch,
            Err(message) => {
                self.refuse(id, &message).await;
                if let Some(rec) = rec {
                    let _ = rec.finish().await;
                }
                return;
            }
        };
        if let Some(pty) = &req.pty
            && let Err(e) = target_channel
                .request_pty(
                    false, &pty.term, pty.cols, pty.rows, pty.px_w, pty.px_h, &pty.modes,
                )
                .await
        {
            self.refuse(id, &format!("target refused the terminal: {e}"))
                .await;
            return;
        }
        let started = match &req.command {
            Some(command) => target_channel.exec(true, command.as_bytes()).await,
            None => target_channel.request_shell(true).await,
        };
        if let Err(e) = started {
            self.refuse(id, &format!("target refused the session: {e}"))
                .await;
            return;
        }
        tracing::info!(peer = %self.peer, user = %self.login.gateway_user, target = %self.login.target, onward_user = %onward_user, recorder = ?rec.as_ref().map(|r| r.recorder), "gateway session started");

        // Phase 3: proxy until either side closes.
        let (mut from_target, to_target) = target_channel.split();
        loop {
            tokio::select! {
                msg = from_client.wait() => match msg {
                    Some(ChannelMsg::Data { data }) => {
                        if let Some(r) = &mut rec && let Err(e) = r.input(&data).await && self.recording_failed(id, &mut rec, &e).await { break; }
                        if to_target.data_bytes(data).await.is_err() { break; }
                    }
                    Some(ChannelMsg::WindowChange { col_width, row_height, pix_width, pix_height }) => {
                        if let Some(r) = &mut rec && let Err(e) = r.resize(col_width, row_height).await && self.recording_failed(id, &mut rec, &e).await { break; }
                        let _ = to_target.window_change(col_width, row_height, pix_width, pix_height).await;
                    }
                    Some(ChannelMsg::Signal { signal }) => { let _ = to_target.signal(signal).await; }
                    Some(ChannelMsg::Eof) => { let _ = to_target.eof().await; }
                    Some(ChannelMsg::Close) | None => break,
                    Some(ChannelMsg::RequestShell { want_reply } | ChannelMsg::Exec { want_reply, .. } | ChannelMsg::RequestSubsystem { want_reply, .. } | ChannelMsg::RequestPty { want_reply, .. }) => {
                        self.reply(id, want_reply, false).await;
                    }
                    Some(_) => {}
                },
                msg = from_target.wait() => match msg {
                    Some(ChannelMsg::Data { data }) => {
                        if let Some(r) = &mut rec && let Err(e) = r.output(&data).await && self.recording_failed(id, &mut rec, &e).await { break; }
                        if to_client.data_bytes(data).await.is_err() { break; }
                    }
                    Some(ChannelMsg::ExtendedData { data, ext }) => {
                        if let Some(r) = &mut rec && let Err(e) = r.output(&data).await && self.recording_failed(id, &mut rec, &e).await { break; }
                        let _ = to_client.extended_data_bytes(ext, data).await;
                    }
                    Some(ChannelMsg::ExitStatus { exit_status }) => { let _ = to_client.exit_status(exit_status).await; }
                    Some(ChannelMsg::ExitSignal { signal_name, core_dumped, error_message, lang_tag }) => {
                        let _ = self.handle.exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag).await;
                    }
                    Some(ChannelMsg::Eof) => { let _ = to_client.eof().await; }
                    Some(ChannelMsg::Close) | None => break,
                    Some(_) => {}
                },
                reason = failure(&mut rec) => {
                    if self.recording_failed(id, &mut rec, &reason).await { break; }
                }
            }
        }
        let _ = to_client.eof().await;
        let _ = to_client.close().await;
        let _ = to_target.close().await;
        if let Some(rec) = rec
            && let Err(e) = rec.finish().await
        {
            tracing::warn!(user = %self.login.gateway_user, target = %self.login.target, error = %e, "gateway recording did not end cleanly");
        }
        tracing::info!(user = %self.login.gateway_user, target = %self.login.target, "gateway session ended");
    }

    /// Applies the mid-session failure policy; true when the session must end.
    async fn recording_failed(
        &self,
        id: ChannelId,
        rec: &mut Option<Recording>,
        reason: &str,
    ) -> bool {
        rec.take();
        match self.gateway.config.on_recording_failure {
            FailurePolicy::Terminate => {
                tracing::warn!(user = %self.login.gateway_user, target = %self.login.target, %reason, "recording failed: ending the session");
                self.refuse(
                    id,
                    &format!("recording failed, session terminated: {reason}"),
                )
                .await;
                true
            }
            FailurePolicy::Continue => {
                tracing::warn!(user = %self.login.gateway_user, target = %self.login.target, %reason, "recording failed: session goes on unrecorded");
                let _ = self.handle.extended_data(id, 1, format!("\r\ncastvault gateway: warning: recording failed ({reason}); this session is no longer recorded\r\n").into_bytes()).await;
                false
            }
        }
    }

    async fn connect(
        &self,
        target: &super::TargetConfig,
        user: &str,
    ) -> Result<Channel<russh::client::Msg>, String> {
        let (host, port) =
            split_host_port(&target.address).ok_or("target address is not host:port")?;
        let refusal = Arc::new(Mutex::new(None));
        let handler = Onward {
            host: host.clone(),
            port,
            known_hosts: self.gateway.known_hosts.clone(),
            refusal: refusal.clone(),
        };
        let config = Arc::new(russh::client::Config {
            inactivity_timeout: None,
            keepalive_interval: Some(std::time::Duration::from_secs(30)),
            nodelay: true,
            preferred: russh::Preferred {
                cipher: std::borrow::Cow::Borrowed(super::CLIENT_CIPHERS),
                ..Default::default()
            },
            ..Default::default()
        });
        let connect = russh::client::connect(config, (host.as_str(), port), handler);
        let mut handle = match tokio::time::timeout(recording::DIAL_TIMEOUT * 2, connect).await {
            Ok(Ok(handle)) => handle,
            Ok(Err(e)) => {
                let refused = refusal
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                return Err(refused
                    .unwrap_or_else(|| format!("cannot reach target {}: {e}", target.address)));
            }
            Err(_) => return Err(format!("target {} did not answer in time", target.address)),
        };
        let key = match &target.key {
            Some(path) => Arc::new(
                russh::keys::load_secret_key(path, None).map_err(|e| format!("target key: {e}"))?,
            ),
            None => self.gateway.client_key.clone(),
        };
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .ok()
            .flatten()
            .flatten();
        let auth = handle
            .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, hash))
            .await
            .map_err(|e| format!("target sign-in failed: {e}"))?;
        if !auth.success() {
            return Err(format!(
                "target refused the gateway's key for user {user:?}"
            ));
        }
        handle
            .channel_open_session()
            .await
            .map_err(|e| format!("target session: {e}"))
    }

    /// The asciicast header: Tailscale's fields where they apply, plus the target.
    fn header(&self, req: &Requested, onward_user: &str, address: &str) -> Map<String, Value> {
        let (cols, rows, term) = match &req.pty {
            Some(p) => (p.cols, p.rows, p.term.as_str()),
            None => (80, 24, ""),
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let connection: [u8; 8] = rand::random();
        let mut header = json!({
            "version": 2,
            "width": cols,
            "height": rows,
            "timestamp": now,
            "env": {"TERM": term},
            "srcNode": self.peer.to_string(),
            "srcNodeUser": self.login.gateway_user,
            "sshUser": onward_user,
            "localUser": onward_user,
            "connectionID": format!("gw-{}", hex::encode(connection)),
            "target": self.login.target,
            "targetAddress": address,
            "gateway": self.gateway.node_id,
            "gatewayAuth": self.login.method,
            "recordsInput": self.gateway.config.record_input,
        });
        if let (Some(command), Some(map)) = (&req.command, header.as_object_mut()) {
            map.insert("command".into(), Value::String(command.clone()));
        }
        match header {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }
}

/// Resolves when the recording fails; never while there is none.
async fn failure(rec: &mut Option<Recording>) -> String {
    match rec {
        Some(r) => r.failure().await,
        None => std::future::pending().await,
    }
}
