//! A realistic asciicast v2 corpus, following the recipe in the shared DEPENDENCIES.md (section 8):
//! 40% directory listings (real `ls -laR /usr` lines when a pool is given, with ANSI colour on
//! directories and symlinks), 30% log lines, 15% `xxd`-style hex dumps of random bytes, 15% an
//! interactive shell typed one keystroke per event; event gaps exponential with a 30 ms mean plus
//! a 1–5 s pause 1% of the time. Lines are JSON the way Go encodes them (control bytes as
//! \u001b, `<`/`>`/`&` escaped). Deterministic for a given seed and pool.

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
fn payloads(rng: &mut Rng, pool: Option<&[String]>, cursor: &mut usize, out: &mut Vec<String>) {
    let kind = rng.below(100);
    if kind < 40 {
        let mut s = String::new();
        for _ in 0..5 + rng.below(55) {
            match pool {
                Some(pool) if !pool.is_empty() => {
                    let line = &pool[*cursor % pool.len()];
                    *cursor += 1;
                    s.push_str(&colour_listing(line));
                }
                _ => {
                    let dir = DIRS[rng.below(DIRS.len() as u64) as usize];
                    let size = rng.below(1 << 20);
                    s.push_str(&format!(
                        "-rw-r--r--  1 root root {size:>8} Nov 25 12:00 {dir}-{}.so.{}",
                        rng.below(999),
                        rng.below(9)
                    ));
                }
            }
            s.push_str("\r\n");
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
            let bytes: Vec<u8> = (0..16).map(|_| rng.below(256) as u8).collect();
            s.push_str(&format!("{:08x}: ", line * 16));
            for pair in bytes.chunks(2) {
                s.push_str(&format!("{:02x}{:02x} ", pair[0], pair[1]));
            }
            s.push(' ');
            s.extend(bytes.iter().map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    b as char
                } else {
                    '.'
                }
            }));
            s.push_str("\r\n");
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

/// Colours the name of a directory (blue) or symlink (cyan) in an `ls -l` line, as `ls --color`.
fn colour_listing(line: &str) -> String {
    let colour = match line.as_bytes().first() {
        Some(b'd') => "01;34",
        Some(b'l') => "01;36",
        _ => return line.to_owned(),
    };
    match line.rsplit_once(' ') {
        Some((head, name)) if line.split_whitespace().count() >= 9 => {
            format!("{head} \u{1b}[{colour}m{name}\u{1b}[0m")
        }
        _ => line.to_owned(),
    }
}

/// Lines of `ls -laR /usr` on this machine, the listing pool of the documented corpus; `None` if
/// `ls` fails.
pub fn listing_pool() -> Option<Vec<String>> {
    let out = std::process::Command::new("ls")
        .args(["-laR", "/usr"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    (!lines.is_empty()).then_some(lines)
}

/// A cast of at least `target_bytes` with synthetic listings (no pool): header line, then
/// `[t, "o", data]` events.
pub fn generate(seed: u64, target_bytes: usize) -> Vec<u8> {
    generate_with(seed, target_bytes, None)
}

/// A cast of at least `target_bytes`, taking listing lines from `pool` when given.
pub fn generate_with(seed: u64, target_bytes: usize, pool: Option<&[String]>) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut cast = header(120, 40).into_bytes();
    cast.push(b'\n');
    let mut t = 0.0f64;
    let mut pieces = Vec::new();
    let mut cursor = 0;
    while cast.len() < target_bytes {
        pieces.clear();
        payloads(&mut rng, pool, &mut cursor, &mut pieces);
        for p in &pieces {
            // Exponential gaps, 30 ms mean.
            let uniform = (rng.below(1 << 30) as f64 + 1.0) / (1u64 << 30) as f64;
            t += -uniform.ln() * 0.030;
            if rng.below(100) == 0 {
                t += 1.0 + rng.below(4) as f64;
            }
            cast.extend_from_slice(format!("[{t:.6},\"o\",\"{}\"]\n", escape(p)).as_bytes());
        }
    }
    cast
}
