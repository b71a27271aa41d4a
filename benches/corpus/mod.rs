//! A deterministic, realistic asciicast v2 corpus: ANSI-coloured directory listings, log lines,
//! hex dumps and an interactive shell typed one keystroke per event, as JSON lines the way Go
//! encodes them (control bytes as \u001b, `<`/`>`/`&` escaped).

/// A small deterministic PRNG (xorshift64*), so corpora are identical across runs and machines.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const WORDS: &[&str] = &[
    "kernel",
    "systemd",
    "nginx",
    "postgres",
    "worker",
    "request",
    "completed",
    "connection",
    "timeout",
    "user",
    "session",
    "cache",
    "volume",
    "mounted",
    "eth0",
    "backup",
    "deploy",
    "rollout",
    "pod",
    "container",
];
const DIRS: &[&str] = &[
    "bin", "lib", "share", "include", "src", "local", "etc", "var", "log", "doc",
];

/// The header line a Tailscale SSH server sends (no trailing newline).
pub fn header(width: u32, height: u32) -> String {
    format!(
        "{{\"version\":2,\"width\":{width},\"height\":{height},\"timestamp\":1764072000,\"srcNode\":\"laptop.tail-net.ts.net\",\"srcNodeID\":\"nguedK2CNTRL\",\"srcNodeUserID\":30585448562688899,\"srcNodeUser\":\"alice@example.com\",\"env\":{{\"TERM\":\"xterm-256color\"}},\"sshUser\":\"alice\",\"localUser\":\"alice\",\"connectionID\":\"ssh-conn-20261125T120000-0a1b2c3d4e\"}}"
    )
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Output payloads for one event.
fn payloads(rng: &mut Rng, out: &mut Vec<String>) {
    let kind = rng.below(100);
    if kind < 40 {
        let mut s = String::new();
        for _ in 0..5 + rng.below(55) {
            let dir = DIRS[rng.below(DIRS.len() as u64) as usize];
            let size = rng.below(1 << 20);
            if rng.below(4) == 0 {
                s.push_str(&format!(
                    "drwxr-xr-x  2 root root {size:>8} Nov 25 12:00 \u{1b}[01;34m{dir}\u{1b}[0m\r\n"
                ));
            } else {
                s.push_str(&format!(
                    "-rw-r--r--  1 root root {size:>8} Nov 25 12:00 {dir}-{}.so.{}\r\n",
                    rng.below(999),
                    rng.below(9)
                ));
            }
        }
        out.push(s);
    } else if kind < 70 {
        let mut s = String::new();
        for _ in 0..1 + rng.below(20) {
            let level = [
                "\u{1b}[32mINFO\u{1b}[0m",
                "\u{1b}[33mWARN\u{1b}[0m",
                "\u{1b}[31mERROR\u{1b}[0m",
            ][rng.below(3) as usize];
            s.push_str(&format!(
                "2026-11-25T12:{:02}:{:02}.{:03}Z {level} {}[{}]: {} {} from 10.{}.{}.{} id={:016x}\r\n",
                rng.below(60), rng.below(60), rng.below(1000),
                WORDS[rng.below(20) as usize], rng.below(65536), WORDS[rng.below(20) as usize], WORDS[rng.below(20) as usize],
                rng.below(256), rng.below(256), rng.below(256), rng.next()
            ));
        }
        out.push(s);
    } else if kind < 85 {
        let mut s = String::new();
        for line in 0..1 + rng.below(30) {
            s.push_str(&format!("{:08x}: ", line * 16));
            for _ in 0..8 {
                s.push_str(&format!("{:04x} ", rng.below(65536)));
            }
            s.push_str(" ................\r\n");
        }
        out.push(s);
    } else {
        out.push("\u{1b}[01;32malice@db-prod\u{1b}[00m:\u{1b}[01;34m~\u{1b}[00m$ ".to_owned());
        let command = format!(
            "{} --{} {}",
            WORDS[rng.below(20) as usize],
            WORDS[rng.below(20) as usize],
            DIRS[rng.below(10) as usize]
        );
        for c in command.chars() {
            out.push(c.to_string());
        }
        if rng.below(5) == 0 {
            out.push("\u{8}\u{1b}[K".to_owned());
        }
        out.push("\r\n".to_owned());
    }
}

/// A cast of at least `target_bytes`: header line, then `[t, "o", data]` events.
pub fn generate(seed: u64, target_bytes: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut cast = header(120, 40).into_bytes();
    cast.push(b'\n');
    let mut t = 0.0f64;
    let mut pieces = Vec::new();
    while cast.len() < target_bytes {
        pieces.clear();
        payloads(&mut rng, &mut pieces);
        for p in &pieces {
            t += (rng.below(60_000) as f64) / 1_000_000.0;
            if rng.below(100) == 0 {
                t += 1.0 + rng.below(4) as f64;
            }
            cast.extend_from_slice(format!("[{t:.6},\"o\",\"{}\"]\n", escape(p)).as_bytes());
        }
    }
    cast
}
