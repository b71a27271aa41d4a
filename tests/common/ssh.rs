//! Real OpenSSH peers for the gateway's tests and bench: a private sshd on loopback, keys made
//! by ssh-keygen, a recorder node, and `castvault gateway` processes.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Node;

/// Longest wait for anything a session shows.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn keygen(path: &Path) {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path));
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn whoami() -> String {
    String::from_utf8(run(Command::new("id").arg("-un")).stdout)
        .unwrap()
        .trim()
        .to_owned()
}

pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real sshd on 127.0.0.1 that admits `authorized` for the current user.
pub struct Sshd {
    pub port: u16,
    _child: Killed,
}

impl Sshd {
    pub fn start(dir: &Path, authorized: &Path) -> Self {
        std::fs::create_dir_all("/run/sshd").unwrap();
        let host_key = dir.join("target_host_key");
        if !host_key.exists() {
            keygen(&host_key);
        }
        let port = free_port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\nLogLevel ERROR\n",
                host_key.display(),
                dir.join("sshd.pid").display(),
                authorized.display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .spawn()
            .expect("start sshd (apt: openssh-server)");
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            port,
            _child: Killed(child),
        }
    }
}

/// Keys, the target sshd, and a recorder.
pub struct Lab {
    pub dir: PathBuf,
    pub sshd: Sshd,
    pub user_key: PathBuf,
    pub node: Node,
}

impl Lab {
    pub async fn new(dir: &Path) -> Self {
        let dir = dir.to_owned();
        // The gateway's own key, admitted by the target.
        keygen(&dir.join("gateway_key"));
        std::fs::copy(
            dir.join("gateway_key.pub"),
            dir.join("target_authorized_keys"),
        )
        .unwrap();
        let sshd = Sshd::start(&dir, &dir.join("target_authorized_keys"));
        let host_pub = std::fs::read_to_string(dir.join("target_host_key.pub")).unwrap();
        let pinned: Vec<&str> = host_pub.split_whitespace().take(2).collect();
        std::fs::write(
            dir.join("known_hosts"),
            format!("[127.0.0.1]:{} {}\n", sshd.port, pinned.join(" ")),
        )
        .unwrap();
        // alice's key, authorized at the gateway.
        let user_key = dir.join("alice_key");
        keygen(&user_key);
        std::fs::create_dir_all(dir.join("keys")).unwrap();
        std::fs::copy(dir.join("alice_key.pub"), dir.join("keys/alice")).unwrap();
        std::fs::copy(dir.join("alice_key.pub"), dir.join("keys/bob")).unwrap();
        // A user CA.
        keygen(&dir.join("user_ca"));
        let node = Node::start(&dir.join("recorder"), &[], &[]).await;
        Self {
            dir,
            sshd,
            user_key,
            node,
        }
    }

    pub fn config(&self, name: &str, recorders: &[SocketAddr], extra: &str) -> PathBuf {
        let recorders: Vec<String> = recorders.iter().map(|r| format!("\"{r}\"")).collect();
        let text = format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nclient_key = {:?}\nauthorized_keys = {:?}\nuser_ca_keys = {:?}\nknown_hosts = {:?}\nrecorders = [{}]\n{extra}\n[gateway.targets.db]\naddress = \"127.0.0.1:{}\"\nuser = {:?}\n[gateway.users.bob]\ntarget = \"db\"\n",
            self.dir.join("gateway_key").display().to_string(),
            format!("{}/keys/%u", self.dir.display()),
            self.dir.join("user_ca.pub").display().to_string(),
            self.dir.join("known_hosts").display().to_string(),
            recorders.join(", "),
            self.sshd.port,
            whoami(),
        );
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn gateway(&self, name: &str, config: &Path) -> Gateway {
        let mut child = Command::new(super::BIN)
            .arg("gateway")
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(self.dir.join(format!("gw-{name}")))
            .env("RUST_LOG", "castvault=info,warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        Gateway {
            addr: v["gateway"].as_str().unwrap().parse().unwrap(),
            _child: Killed(child),
        }
    }

    /// `ssh` through the gateway, non-interactive, with `key` (or alice's).
    pub fn ssh(
        &self,
        gw: &Gateway,
        login: &str,
        key: Option<&Path>,
        extra: &[&str],
        command: &str,
    ) -> std::process::Output {
        Command::new("ssh")
            .args(ssh_options(gw, key.unwrap_or(&self.user_key)))
            .args(extra)
            .arg(format!("{login}@127.0.0.1"))
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

pub fn ssh_options(gw: &Gateway, key: &Path) -> Vec<String> {
    vec![
        "-p".into(),
        gw.addr.port().to_string(),
        "-i".into(),
        key.display().to_string(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "StrictHostKeyChecking=no".into(),
        "-o".into(),
        "UserKnownHostsFile=/dev/null".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
    ]
}

pub struct Gateway {
    pub addr: SocketAddr,
    pub _child: Killed,
}
