//! The recording SSH gateway with real peers: the OpenSSH client (under tmux for a real
//! terminal) → `castvault gateway` → a real OpenSSH sshd on loopback, recorded on a real
//! castvault node.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::ssh::{Gateway, Lab, WAIT, keygen, run, ssh_options, whoami};
use common::tmux::Tmux;

fn interactive(lab: &Lab, gw: &Gateway, name: &str, login: &str) -> (Tmux, PathBuf) {
    let exit_file = lab.dir.join(format!("{name}.exit"));
    let command = format!(
        "ssh -tt {} {login}@127.0.0.1; echo \"exit=$?\" > {}; sleep 60",
        ssh_options(gw, &lab.user_key).join(" "),
        exit_file.display()
    );
    (Tmux::start(name, &command), exit_file)
}

fn wait_file(path: &Path) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && !text.is_empty()
        {
            return text.trim().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{} never written",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An interactive session under tmux: commands run, the window is resized, the exit status
/// reaches the client; the recording holds the output, the resize and the header facts. Exec
/// sessions, certificates and every refusal are checked on the same gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_proxied_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = Lab::new(tmp.path()).await;
    let config = lab.config("main", &[lab.node.ingest], "");
    let gw = lab.gateway("main", &config);

    let (tmux, exit_file) = interactive(&lab, &gw, "main", "alice%db");
    tmux.keys("echo hello-$((6*7))");
    tmux.wait_for("hello-42");
    tmux.resize(120, 40);
    std::thread::sleep(Duration::from_millis(500));
    tmux.keys("stty size");
    tmux.wait_for("40 120");
    tmux.keys("exit 3");
    assert_eq!(wait_file(&exit_file), "exit=3");

    let rows = lab.node.wait_finalized(1).await;
    let id = rows[0]["id"].as_str().unwrap();
    let cast = String::from_utf8(lab.node.export(id)).unwrap();
    let header: serde_json::Value = serde_json::from_str(cast.lines().next().unwrap()).unwrap();
    assert_eq!(header["target"], "db");
    assert_eq!(header["sshUser"], whoami());
    assert_eq!(header["srcNodeUser"], "alice");
    assert!(
        header["srcNode"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert_eq!(
        (header["width"].as_u64(), header["height"].as_u64()),
        (Some(100), Some(30))
    );
    assert_eq!(header["recordsInput"], false);
    assert!(cast.contains("hello-42"), "{cast}");
    assert!(
        cast.lines().any(|l| l.contains("\"r\",\"120x40\"")),
        "no resize event:\n{cast}"
    );
    assert!(
        !cast.lines().skip(1).any(|l| l.contains("\"i\",")),
        "input recorded against policy"
    );

    // Exec: output and exit status; the command is in the header.
    let out = lab.ssh(&gw, "bob", None, &[], "echo via-exec; exit 7");
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "via-exec");
    let rows = lab.node.wait_finalized(2).await;
    let exec = rows.iter().find(|r| r["id"] != id).unwrap();
    let cast = String::from_utf8(lab.node.export(exec["id"].as_str().unwrap())).unwrap();
    assert!(
        cast.lines()
            .next()
            .unwrap()
            .contains("\"command\":\"echo via-exec; exit 7\"")
    );

    // With input recording on, what the user sends is recorded as `i` events, and the header
    // says so.
    let typed = lab.config("typed", &[lab.node.ingest], "record_input = true\n");
    let gw_typed = lab.gateway("typed", &typed);
    let mut cat = Command::new("ssh")
        .args(ssh_options(&gw_typed, &lab.user_key))
        .args(["alice%db@127.0.0.1", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = cat.stdin.take().unwrap();
        stdin.write_all(b"typed-secret-input\n").unwrap();
    }
    let out = cat.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "typed-secret-input"
    );
    let rows = lab.node.wait_finalized(3).await;
    let typed_cast = rows
        .iter()
        .map(|r| String::from_utf8(lab.node.export(r["id"].as_str().unwrap())).unwrap())
        .find(|c| c.lines().next().unwrap().contains("\"recordsInput\":true"))
        .expect("the input-recording session");
    assert!(
        typed_cast
            .lines()
            .any(|l| l.contains("\"i\",\"typed-secret-input\\n\"")),
        "{typed_cast}"
    );

    // A user certificate from the trusted CA signs in; one from another CA does not.
    let cert_key = lab.dir.join("cert_key");
    keygen(&cert_key);
    run(Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(lab.dir.join("user_ca"))
        .args(["-I", "alice-cert", "-n", "alice", "-V", "+1h"])
        .arg(cert_key.with_extension("pub")));
    let out = lab.ssh(
        &gw,
        "alice%db",
        Some(&cert_key),
        &[
            "-o",
            &format!(
                "CertificateFile={}",
                lab.dir.join("cert_key-cert.pub").display()
            ),
        ],
        "echo by-cert",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "by-cert",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rogue_ca = lab.dir.join("rogue_ca");
    keygen(&rogue_ca);
    let rogue_key = lab.dir.join("rogue_key");
    keygen(&rogue_key);
    run(Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(&rogue_ca)
        .args(["-I", "rogue", "-n", "alice", "-V", "+1h"])
        .arg(rogue_key.with_extension("pub")));
    let out = lab.ssh(
        &gw,
        "alice%db",
        Some(&rogue_key),
        &[
            "-o",
            &format!(
                "CertificateFile={}",
                lab.dir.join("rogue_key-cert.pub").display()
            ),
        ],
        "true",
    );
    assert_eq!(out.status.code(), Some(255));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));

    // Refusals: wrong key, unknown user, unknown target, SFTP.
    let stranger = lab.dir.join("stranger");
    keygen(&stranger);
    let out = lab.ssh(&gw, "alice%db", Some(&stranger), &[], "true");
    assert_eq!(out.status.code(), Some(255));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    let out = lab.ssh(&gw, "mallory", None, &[], "true");
    assert_eq!(out.status.code(), Some(255));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    let out = lab.ssh(&gw, "alice%nowhere", None, &[], "true");
    assert_eq!(out.status.code(), Some(255));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown target \"nowhere\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sftp = Command::new("sftp")
        .args(["-P", &gw.addr.port().to_string(), "-i"])
        .arg(&lab.user_key)
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "alice%db@127.0.0.1",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!sftp.status.success());
    assert!(
        String::from_utf8_lossy(&sftp.stderr).contains("subsystem request failed"),
        "{}",
        String::from_utf8_lossy(&sftp.stderr)
    );

    // A target whose host key changed is refused.
    let other = lab.dir.join("other_host");
    keygen(&other);
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let pinned: Vec<&str> = other_pub.split_whitespace().take(2).collect();
    std::fs::write(
        lab.dir.join("known_hosts"),
        format!("[127.0.0.1]:{} {}\n", lab.sshd.port, pinned.join(" ")),
    )
    .unwrap();
    let out = lab.ssh(&gw, "alice%db", None, &[], "true");
    assert_eq!(out.status.code(), Some(255));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TARGET HOST KEY CHANGED"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Recorder failures under each policy: none reachable refuses the session; a recorder killed
/// mid-session ends it under `terminate`, and lets it go on under `continue`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorder_failures_follow_the_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let mut lab = Lab::new(tmp.path()).await;

    let dead = lab.config("dead", &[common::dead_addr()], "");
    let gw = lab.gateway("dead", &dead);
    let out = lab.ssh(&gw, "alice%db", None, &[], "echo should-not-run");
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("session refused: no recorder accepted the recording"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("should-not-run"));

    // The first recorder is down, the second takes it (the ordered list).
    let failover = lab.config("failover", &[common::dead_addr(), lab.node.ingest], "");
    let gw = lab.gateway("failover", &failover);
    let out = lab.ssh(&gw, "alice%db", None, &[], "echo recorded-on-second");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "recorded-on-second"
    );

    // Killed mid-session, fail-open: the session goes on, with a warning.
    let open = lab.config(
        "open",
        &[lab.node.ingest],
        "on_recording_failure = \"continue\"\n",
    );
    let gw_open = lab.gateway("open", &open);
    let (tmux, exit_file) = interactive(&lab, &gw_open, "open", "alice%db");
    tmux.keys("echo before-$((1+1))");
    tmux.wait_for("before-2");
    lab.node.kill9();
    tmux.keys("echo after-$((2+2))");
    tmux.wait_for("no longer recorded");
    tmux.keys("echo still-$((3+3))");
    tmux.wait_for("still-6");
    tmux.keys("exit 0");
    assert_eq!(wait_file(&exit_file), "exit=0");
    drop(tmux);

    // Killed mid-session, terminate: the session ends with the message.
    lab.node.restart().await;
    let strict = lab.config("strict", &[lab.node.ingest], "");
    let gw_strict = lab.gateway("strict", &strict);
    let (tmux, exit_file) = interactive(&lab, &gw_strict, "strict", "alice%db");
    tmux.keys("echo before-$((1+1))");
    tmux.wait_for("before-2");
    lab.node.kill9();
    tmux.keys("echo after-$((2+2))");
    tmux.wait_for("recording failed, session terminated");
    assert_eq!(wait_file(&exit_file), "exit=255");
}

/// Limits: connections per address, authentication attempts per address, idle connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_limits_hold() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = Lab::new(tmp.path()).await;
    let config = lab.config(
        "limits",
        &[lab.node.ingest],
        "max_connections_per_peer = 2\nauth_attempts_per_minute = 3\nidle_timeout = \"2s\"\n",
    );
    let gw = lab.gateway("limits", &config);

    // Two connections held open; the third from the same address is closed at once.
    let held: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(gw.addr).unwrap())
        .collect();
    let out = lab.ssh(&gw, "alice%db", None, &[], "true");
    assert_eq!(
        out.status.code(),
        Some(255),
        "a third connection was served"
    );
    drop(held);
    // Idle connections were closed by the idle timeout meanwhile; a session works again.
    std::thread::sleep(Duration::from_secs(3));
    let out = lab.ssh(&gw, "alice%db", None, &[], "echo ok");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An idle interactive session is closed after the idle timeout.
    let started = Instant::now();
    let mut idle = Command::new("ssh")
        .args(ssh_options(&gw, &lab.user_key))
        .args(["alice%db@127.0.0.1", "sleep 600"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = idle.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < WAIT, "an idle session was never closed");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());

    // Authentication attempts: wrong keys use up the address's allowance; then even the right
    // key is refused for a while.
    let stranger = lab.dir.join("stranger");
    keygen(&stranger);
    for _ in 0..3 {
        let out = lab.ssh(&gw, "alice%db", Some(&stranger), &[], "true");
        assert_eq!(out.status.code(), Some(255));
    }
    let out = lab.ssh(&gw, "alice%db", None, &[], "echo should-not-run");
    assert_eq!(out.status.code(), Some(255), "rate limit not applied");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
}
