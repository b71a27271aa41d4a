//! The chunk codec.
//!
//! Framing: a chunk object is exactly one zstd frame (content size and checksum flags set) whose
//! content is a run of whole asciicast lines, each ending in `\n`. Only a recording's last chunk
//! may end in a partial line, when the client stopped mid-line. Chunk 0 starts with the header
//! line. Decompressing a recording's chunks in sequence and concatenating them gives exactly the
//! bytes the client sent. Any stock `zstd -d` reads a chunk.
//!
//! Decoding is always capped: a chunk never inflates past the length its manifest names (or
//! [`MAX_DECODED_CHUNK_BYTES`] when no manifest is at hand).

use sha2::{Digest, Sha256};

use crate::cast::parse_event;

/// Upper bound on one chunk's raw length: the largest configurable chunk plus the largest
/// configurable line, so that a chunk can always be extended to the end of its last line.
pub const MAX_DECODED_CHUNK_BYTES: usize = 256 << 20;

/// Why a chunk could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("zstd compression failed")]
    Compress(#[source] std::io::Error),
    #[error("chunk is not a valid zstd frame or exceeds {capacity} bytes")]
    Decompress {
        capacity: usize,
        #[source]
        source: std::io::Error,
    },
}

/// A reusable compression context. Contexts are pooled by the uploader, never held per stream.
pub struct ChunkEncoder {
    compressor: zstd::bulk::Compressor<'static>,
}

impl ChunkEncoder {
    /// # Errors
    /// [`ChunkError::Compress`] when zstd rejects the level.
    pub fn new(level: i32) -> Result<Self, ChunkError> {
        let mut compressor = zstd::bulk::Compressor::new(level).map_err(ChunkError::Compress)?;
        compressor
            .include_checksum(true)
            .map_err(ChunkError::Compress)?;
        compressor
            .include_contentsize(true)
            .map_err(ChunkError::Compress)?;
        Ok(Self { compressor })
    }

    /// The thorough setting: zstd's lazy parser (row match finder) with a 512 KiB window, 64 Ki
    /// hash and chain entries, 4-way search and 6-byte minimum matches. Measured on the bench
    /// corpus (100 MiB of terminal output) in one frame per 4 MiB, 1 MiB, 256 KiB and 64 KiB:
    /// 0.946x, 0.949x, 0.959x and 0.995x the size of `gzip -6` at about 160 MB/s on one core,
    /// where level 1 stored 1.021x, 1.023x, 1.028x and 1.061x at about 570 MB/s. The greedy
    /// parser was about 20% faster and stored 0.971x to 1.015x; level 5 0.986x at 165 MB/s.
    /// Fast and dfast parsers with any hash size or minimum match stored at least 1.019x.
    ///
    /// # Errors
    /// [`ChunkError::Compress`] when zstd rejects a parameter.
    pub fn thorough() -> Result<Self, ChunkError> {
        use zstd::zstd_safe::{CParameter, Strategy};
        let mut encoder = Self::new(1)?;
        for parameter in [
            CParameter::Strategy(Strategy::ZSTD_lazy),
            CParameter::WindowLog(19),
            CParameter::HashLog(16),
            CParameter::ChainLog(16),
            CParameter::SearchLog(2),
            CParameter::MinMatch(6),
        ] {
            encoder
                .compressor
                .set_parameter(parameter)
                .map_err(ChunkError::Compress)?;
        }
        Ok(encoder)
    }

    /// Compresses `raw` into one zstd frame.
    ///
    /// # Errors
    /// [`ChunkError::Compress`] on a zstd failure.
    pub fn encode(&mut self, raw: &[u8]) -> Result<Vec<u8>, ChunkError> {
        self.compressor.compress(raw).map_err(ChunkError::Compress)
    }
}

/// Decompresses one chunk, refusing to produce more than `capacity` bytes.
///
/// # Errors
/// [`ChunkError::Decompress`] on a corrupt frame or one that inflates past `capacity`.
pub fn decode(compressed: &[u8], capacity: usize) -> Result<Vec<u8>, ChunkError> {
    let capacity = capacity.min(MAX_DECODED_CHUNK_BYTES);
    zstd::bulk::decompress(compressed, capacity)
        .map_err(|source| ChunkError::Decompress { capacity, source })
}

/// Decompresses zstd frames that arrive in pieces (a stored transcript read as a stream), with
/// memory bounded by one output window.
pub struct StreamDecoder {
    decoder: zstd::stream::raw::Decoder<'static>,
}

/// Output produced per step of [`StreamDecoder::feed`].
const STREAM_WINDOW: usize = 128 << 10;

impl StreamDecoder {
    /// # Errors
    /// [`ChunkError::Decompress`] when zstd cannot make a context.
    pub fn new() -> Result<Self, ChunkError> {
        let decoder =
            zstd::stream::raw::Decoder::new().map_err(|source| ChunkError::Decompress {
                capacity: 0,
                source,
            })?;
        Ok(Self { decoder })
    }

    /// Decompresses `input`, appending what it yields to `out`.
    ///
    /// # Errors
    /// [`ChunkError::Decompress`] on corrupt input.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), ChunkError> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let mut window = vec![0u8; STREAM_WINDOW];
        let mut input = InBuffer::around(input);
        loop {
            let mut output = OutBuffer::around(&mut window[..]);
            self.decoder
                .run(&mut input, &mut output)
                .map_err(|source| ChunkError::Decompress {
                    capacity: 0,
                    source,
                })?;
            let produced = output.pos();
            out.extend_from_slice(&window[..produced]);
            // Done when the input is used up and zstd had room to spare (nothing held back).
            if input.pos() == input.src.len() && produced < STREAM_WINDOW {
                return Ok(());
            }
        }
    }
}

/// Compresses a whole text (a transcript) as one zstd frame with its checksum.
///
/// # Errors
/// [`ChunkError::Compress`] on a zstd failure.
pub fn compress(raw: &[u8], level: i32) -> Result<Vec<u8>, ChunkError> {
    ChunkEncoder::new(level)?.encode(raw)
}

/// A reusable decompression context, for readers that decode many chunks in a row (verify):
/// a fresh context per chunk costs its allocation every time.
pub struct ChunkDecoder {
    decompressor: zstd::bulk::Decompressor<'static>,
}

impl ChunkDecoder {
    /// # Errors
    /// [`ChunkError::Decompress`] when zstd cannot make a context.
    pub fn new() -> Result<Self, ChunkError> {
        let decompressor =
            zstd::bulk::Decompressor::new().map_err(|source| ChunkError::Decompress {
                capacity: 0,
                source,
            })?;
        Ok(Self { decompressor })
    }

    /// As [`decode`], into `out` (cleared first), whose memory is reused from chunk to chunk:
    /// a fresh 4 MiB buffer per chunk costs a page fault per 4 KiB.
    ///
    /// # Errors
    /// As [`decode`].
    pub fn decode_into(
        &mut self,
        compressed: &[u8],
        capacity: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), ChunkError> {
        let capacity = capacity.min(MAX_DECODED_CHUNK_BYTES);
        out.clear();
        out.reserve(capacity);
        self.decompressor
            .decompress_to_buffer(compressed, out)
            .map(|_| ())
            .map_err(|source| ChunkError::Decompress { capacity, source })
    }

    /// As [`decode`].
    ///
    /// # Errors
    /// As [`decode`].
    pub fn decode(&mut self, compressed: &[u8], capacity: usize) -> Result<Vec<u8>, ChunkError> {
        let capacity = capacity.min(MAX_DECODED_CHUNK_BYTES);
        self.decompressor
            .decompress(compressed, capacity)
            .map_err(|source| ChunkError::Decompress { capacity, source })
    }
}

/// How many bytes of `pending` (the bytes not yet in a chunk, from the start of a line) form the
/// next chunk, or `None` to wait for more.
///
/// The chunk ends at the last newline within `max_chunk_bytes`; when the first line is longer
/// than that, the chunk extends to that line's end. `final_cut` takes everything, partial last
/// line included (the stream has ended).
pub fn next_chunk_len(pending: &[u8], max_chunk_bytes: usize, final_cut: bool) -> Option<usize> {
    if pending.is_empty() {
        return None;
    }
    let window = &pending[..pending.len().min(max_chunk_bytes)];
    if final_cut && pending.len() <= max_chunk_bytes {
        return Some(pending.len());
    }
    if let Some(pos) = memrchr(window) {
        return Some(pos + 1);
    }
    match pending[window.len()..].iter().position(|&b| b == b'\n') {
        Some(pos) => Some(window.len() + pos + 1),
        None if final_cut => Some(pending.len()),
        None => None,
    }
}

fn memrchr(bytes: &[u8]) -> Option<usize> {
    bytes.iter().rposition(|&b| b == b'\n')
}

/// What a chunk's lines say, for the manifest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChunkStats {
    /// Well-formed event lines.
    pub events: u64,
    /// Complete lines that are not well-formed events (kept byte-exact, counted here).
    pub malformed_lines: u64,
    /// The chunk ends without a newline (only a recording's last chunk may).
    pub partial_last_line: bool,
    pub first_event_time: Option<f64>,
    pub last_event_time: Option<f64>,
    /// Event times that went backwards.
    pub non_monotonic: u64,
}

impl ChunkStats {
    /// Scans `raw`. When `starts_with_header` the first line is the header, not an event.
    pub fn scan(raw: &[u8], starts_with_header: bool) -> Self {
        let mut stats = Self::default();
        // memchr finds the line ends a vector at a time; a byte-wise split was 40% of the scan.
        let mut start = 0;
        let mut lines = memchr::memchr_iter(b'\n', raw).map(|end| {
            let line = &raw[start..=end];
            start = end + 1;
            line
        });
        if starts_with_header {
            lines.next();
        }
        for line in lines.by_ref() {
            stats.count(line);
        }
        drop(lines);
        // A last line without its newline (the header counts as a line too).
        stats.partial_last_line = start < raw.len() && !(starts_with_header && start == 0);
        stats
    }

    /// Counts one complete line.
    fn count(&mut self, line: &[u8]) {
        if line.trim_ascii().is_empty() {
            return;
        }
        match parse_event(line) {
            Some((time, _code)) => {
                self.events += 1;
                if self.last_event_time.is_some_and(|last| time < last) {
                    self.non_monotonic += 1;
                }
                self.first_event_time.get_or_insert(time);
                self.last_event_time = Some(time);
            }
            None => self.malformed_lines += 1,
        }
    }
}

/// SHA-256 of a chunk's raw bytes.
pub fn digest(raw: &[u8]) -> [u8; 32] {
    Sha256::digest(raw).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_decoder_takes_any_split() {
        let text: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("{{\"t\":{i}}}\n").into_bytes())
            .collect();
        let z = compress(&text, 3).unwrap();
        for piece in [1, 7, 4096, z.len()] {
            let mut d = StreamDecoder::new().unwrap();
            let mut out = Vec::new();
            for p in z.chunks(piece) {
                d.feed(p, &mut out).unwrap();
            }
            assert_eq!(out, text, "pieces of {piece}");
        }
        let mut bad = z.clone();
        bad[z.len() / 2] ^= 0xff;
        let mut out = Vec::new();
        assert!(StreamDecoder::new().unwrap().feed(&bad, &mut out).is_err());
    }

    #[test]
    fn round_trip_is_byte_exact_and_capped() {
        let raw = b"{\"version\":2}\n[0.1,\"o\",\"hi\"]\n".repeat(100);
        let mut enc = ChunkEncoder::new(3).unwrap();
        let z = enc.encode(&raw).unwrap();
        assert_eq!(decode(&z, raw.len()).unwrap(), raw);
        assert!(decode(&z, raw.len() - 1).is_err());
        assert!(decode(b"not zstd", 100).is_err());
    }

    /// The thorough setting writes a frame any decoder reads back exactly (content size and
    /// checksum included), smaller than level 1's on terminal-like output.
    #[test]
    fn thorough_frames_are_exact_and_smaller() {
        let mut raw = b"{\"version\":2,\"width\":80,\"height\":24}\n".to_vec();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let words = [
            "ls",
            "-la",
            "\\u001b[01;34m",
            "\\u001b[0m",
            "syslog",
            "4096",
            "kernel:",
        ];
        for i in 0..20_000 {
            raw.extend_from_slice(
                format!("[{}.{:06}, \"o\", \"", i / 100, i % 100 * 7919).as_bytes(),
            );
            for _ in 0..8 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                raw.extend_from_slice(words[(seed % words.len() as u64) as usize].as_bytes());
                raw.push(b' ');
            }
            raw.extend_from_slice(b"\\r\\n\"]\n");
        }
        let fast = ChunkEncoder::new(1).unwrap().encode(&raw).unwrap();
        let thorough = ChunkEncoder::thorough().unwrap().encode(&raw).unwrap();
        assert_eq!(decode(&thorough, raw.len()).unwrap(), raw);
        assert!(decode(&thorough, raw.len() - 1).is_err());
        assert!(
            thorough.len() < fast.len(),
            "thorough {} bytes, level 1 {}",
            thorough.len(),
            fast.len()
        );
    }

    #[test]
    fn cuts_at_whole_lines() {
        let p = b"aaa\nbbb\ncc";
        assert_eq!(next_chunk_len(p, 100, false), Some(8));
        assert_eq!(next_chunk_len(p, 100, true), Some(10));
        assert_eq!(next_chunk_len(p, 6, false), Some(4));
        assert_eq!(next_chunk_len(b"cc", 100, false), None);
        assert_eq!(next_chunk_len(b"", 100, true), None);
        // A line longer than the chunk size extends the chunk to its end.
        assert_eq!(next_chunk_len(b"aaaaaaaa\nb", 4, false), Some(9));
        assert_eq!(next_chunk_len(b"aaaaaaaa", 4, false), None);
        assert_eq!(next_chunk_len(b"aaaaaaaa", 4, true), Some(8));
    }

    /// The line split by memchr agrees with a plain split on every shape of ending.
    #[test]
    fn stats_agree_with_a_plain_line_split() {
        fn reference(raw: &[u8], header: bool) -> ChunkStats {
            let mut stats = ChunkStats::default();
            let mut lines = raw.split_inclusive(|&b| b == b'\n');
            if header {
                lines.next();
            }
            for line in lines {
                if line.last() != Some(&b'\n') {
                    stats.partial_last_line = true;
                    break;
                }
                stats.count(line);
            }
            stats
        }
        let cases: [&[u8]; 10] = [
            b"",
            b"\n",
            b"{\"version\":2}",
            b"{\"version\":2}\n",
            b"{\"version\":2}\n[1,\"o\",\"a\"]",
            b"{\"version\":2}\n[1,\"o\",\"a\"]\n",
            b"[1,\"o\",\"a\"]\n \n[0.5,\"o\",\"b\"]\n  ",
            b"[1,\"o\",\"a\"]\nnot json\n\n\n",
            b"[1,\"o\",\"a\"",
            b"\n\n[2,\"o\",\"x\"]\n[3,\"i\",\"y\"]\n[4,",
        ];
        for raw in cases {
            for header in [false, true] {
                assert_eq!(
                    ChunkStats::scan(raw, header),
                    reference(raw, header),
                    "{:?} header {header}",
                    String::from_utf8_lossy(raw)
                );
            }
        }
    }

    #[test]
    fn stats_count_events_and_malformed_lines() {
        let raw = b"{\"version\":2}\n[0.5,\"o\",\"a\"]\nnot json\n[0.25,\"o\",\"b\"]\n\n[1e0,\"r\",\"24x80\"]\n[2,\"o\",\"tr";
        let s = ChunkStats::scan(raw, true);
        assert_eq!(s.events, 3);
        assert_eq!(s.malformed_lines, 1);
        assert_eq!(s.non_monotonic, 1);
        assert!(s.partial_last_line);
        assert_eq!(s.first_event_time, Some(0.5));
        assert_eq!(s.last_event_time, Some(1.0));
    }
}
