//! The ingest listener's HTTP/1.1 path, end to end: raw bytes from a client (request line,
//! headers, `Expect: 100-continue`, chunked or sized bodies, the asciicast inside) to a real
//! recorder node running in this process on 127.0.0.1, storing to a local-disk store. The node
//! must answer or close every connection and stay up: after every input a well-formed recording
//! still gets its 200.
#![no_main]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;

/// Longest wait for the node's answer to one input; inputs end with a FIN, so a healthy node
/// answers or closes well within it.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

const GOOD: &[u8] =
    b"POST /record HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n\
2f\r\n{\"version\":2,\"width\":80,\"height\":24}\n[0.1,\"o\",\"\"]\n\r\n0\r\n\r\n";

struct Node {
    ingest: SocketAddr,
    _dir: tempfile::TempDir,
}

fn node() -> &'static Node {
    static NODE: OnceLock<Node> = OnceLock::new();
    NODE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let config: castvault::config::Config = toml::from_str(&format!(
            "data_dir = {:?}\nmin_free_disk_bytes = 0\n[limits]\nevents_per_second_per_peer = 1000000\nheader_timeout = \"5s\"\n",
            dir.path().display().to_string()
        ))
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let background = castvault::background::runtime().unwrap();
            rt.block_on(async move {
                let ingest = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let web = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(ingest.local_addr().unwrap()).unwrap();
                let listeners = castvault::app::Listeners { ingest, web };
                let stop = tokio_util::sync::CancellationToken::new();
                castvault::app::run(config, background.handle(), listeners, stop)
                    .await
                    .unwrap();
            });
        });
        let ingest = rx.recv().unwrap();
        // Wait until the node takes recordings.
        for _ in 0..600 {
            if exchange(ingest, GOOD).starts_with(b"HTTP/1.1 200") {
                return Node { ingest, _dir: dir };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("recorder never became ready");
    })
}

/// Sends `input`, half-closes, and reads the answer until the node closes or the timeout.
fn exchange(addr: SocketAddr, input: &[u8]) -> Vec<u8> {
    let Ok(mut conn) = TcpStream::connect(addr) else {
        return Vec::new();
    };
    conn.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    conn.set_write_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    let _ = conn.write_all(input);
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    answer
}

fuzz_target!(|data: &[u8]| {
    let node = node();
    let answer = exchange(node.ingest, data);
    if answer.starts_with(b"HTTP/1.1 500") {
        panic!(
            "internal error for input: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    // Every so often, the node must still record a good stream.
    if data.len() % 64 == 0 {
        let good = exchange(node.ingest, GOOD);
        assert!(
            good.starts_with(b"HTTP/1.1 100 Continue") || good.starts_with(b"HTTP/1.1 200"),
            "node stopped recording: {}",
            String::from_utf8_lossy(&good)
        );
    }
});
