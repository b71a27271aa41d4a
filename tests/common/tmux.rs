//! A tmux server of a test's own, for driving terminal programs and reading their screen.

use std::process::Command;
use std::time::{Duration, Instant};

use super::ssh::{WAIT, run};

/// A tmux server of the test's own, with one window running `command`.
pub struct Tmux {
    socket: String,
}

impl Tmux {
    pub fn start(name: &str, command: &str) -> Self {
        let socket = format!("castvault-test-{name}-{}", std::process::id());
        run(Command::new("tmux").args([
            "-L",
            &socket,
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "100",
            "-y",
            "30",
            command,
        ]));
        Self { socket }
    }

    pub fn keys(&self, keys: &str) {
        run(Command::new("tmux").args(["-L", &self.socket, "send-keys", "-t", "t", keys, "Enter"]));
    }

    /// Presses one key by tmux's name for it (`Space`, `Right`, `q`), without Enter.
    pub fn press(&self, key: &str) {
        run(Command::new("tmux").args(["-L", &self.socket, "send-keys", "-t", "t", key]));
    }

    /// The pid of the pane's process (the shell running the command).
    pub fn pane_pid(&self) -> u32 {
        let out = Command::new("tmux")
            .args([
                "-L",
                &self.socket,
                "list-panes",
                "-t",
                "t",
                "-F",
                "#{pane_pid}",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    pub fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", "-p", "-t", "t"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn wait_for(&self, text: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let screen = self.screen();
            if screen.contains(text) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "{text:?} never appeared; screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn resize(&self, cols: u16, rows: u16) {
        run(Command::new("tmux").args([
            "-L",
            &self.socket,
            "resize-window",
            "-t",
            "t",
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
        ]));
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}
