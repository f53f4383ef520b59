//! A compressor that works on several threads and gives the same bytes whatever their number.
//!
//! The input is cut at fixed offsets into pieces (every [`Format::piece_size`] bytes) that are
//! compressed independently, on a pool of worker threads, and written out in order. A piece's
//! bytes depend only on its input (and, for gzip, the 32 KiB before it and whether it is the
//! last): not on the thread that compressed it, nor on how the input was split into `write`
//! calls, nor on the number of threads. So the blob is identical for 1, 2 or 4 threads and on
//! every machine, given the pinned flate2 / zlib-rs / zstd versions. The piece sizes, the
//! dictionary size, the levels and the incompressibility rule are part of the format: changing
//! them changes every layer digest.
//!
//! Workers take queued pieces themselves, so the thread that cuts the input only has to keep
//! the queue filled: a few milliseconds without a CPU for it (a shared machine) do not leave
//! the workers idle. (zstd's own multithreading hands each job out from the caller's thread,
//! one job ahead, which made its workers wait for that thread under load.)
//!
//! **gzip** (the layout pigz uses): one gzip member holding one deflate stream.
//! - each 1 MiB piece is compressed by a fresh level-6 (or `compression-level=`) raw deflate
//!   compressor primed with the last 32 KiB of the input before it (the deflate window, so
//!   matches can still reach back across the cut, and the ratio stays within a fraction of a
//!   percent of one compressor);
//! - a piece that a level-1 trial on samples of it finds incompressible (see
//!   [`incompressible`]) is written as stored blocks instead: level 6 spends most of its time
//!   failing to find matches in random or already compressed data;
//! - every piece but the last ends byte-aligned without a final block (a sync flush, or the
//!   end of a stored block), so the pieces concatenate into one valid deflate stream; the last
//!   one ends with the final block;
//! - the trailer's CRC-32 is the combination of the pieces' CRCs;
//! - the header is fixed: no file name, mtime 0, XFL 0 (level 6; 2 at level 9, 4 at level 1),
//!   OS 255 ("unknown"), the header flate2's `GzBuilder` wrote for these layers before.
//!
//! **zstd**: each 4 MiB piece is one complete level-3 (or `compression-level=`'s) frame
//! (content size and checksum included). Concatenated frames are one valid zstd stream (RFC
//! 8878 §3.1; the zstd CLI, Go's klauspost/compress used by containerd and containers/storage,
//! and the zstd crate decode them whole; zstd:chunked layers are made the same way). Independent 4 MiB frames
//! cost about 0.03% in size against one frame on a tar of mixed files. A piece that the same
//! trial as gzip's finds incompressible is one frame of raw blocks (content size, no checksum:
//! the layer's digest covers it) instead: level 3 spends its time failing to find matches.
//!
//! Memory is bounded: at most [`Format::window`] pieces are in flight (each its input and its
//! compressed bytes), plus the piece being filled; the whole layer is never held.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flate2::{Compress, FlushCompress, Status};

/// CRC-32 of a piece (or of the pieces so far) and its length, for the gzip trailer.
/// crc32fast, not flate2's `Crc`: with the zlib-rs backend built without `std` (so that no
/// CPU feature detection can touch the deflate output), flate2's CRC is the table-driven
/// one, about six times slower than crc32fast's PCLMULQDQ path. The value is the same.
#[derive(Clone, Default)]
struct Crc {
    hasher: crc32fast::Hasher,
    len: u64,
}

impl Crc {
    fn new() -> Crc {
        Crc::default()
    }

    fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.len += data.len() as u64;
    }

    fn combine(&mut self, other: &Crc) {
        self.hasher.combine(&other.hasher);
        self.len += other.len;
    }

    fn sum(&self) -> u32 {
        self.hasher.clone().finalize()
    }

    /// The length mod 2^32, as the gzip trailer holds it.
    fn amount(&self) -> u32 {
        self.len as u32
    }
}

/// The preset dictionary of a gzip piece: the deflate window, the most a back-reference can
/// reach.
const DICT_SIZE: usize = 32 * 1024;
/// gzip header: magic, CM deflate, FLG none, MTIME 0, XFL 0, OS 255 (XFL is 2 at level 9
/// and 4 at level 1, as RFC 1952 and Go's writer say: see [`header`]).
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];

/// The gzip header of a stream compressed at `level`.
fn header(level: i32) -> [u8; 10] {
    let mut h = HEADER;
    h[8] = match level {
        9 => 2,
        1 => 4,
        _ => 0,
    };
    h
}
/// The most a stored deflate block holds.
const STORED_MAX: usize = 65_535;
/// The incompressibility trial: this many samples of this many bytes, spread over the piece.
const SAMPLES: usize = 4;
const SAMPLE_SIZE: usize = 16 * 1024;

/// The compressed format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Gzip,
    Zstd,
}

impl Format {
    /// Bytes of input per independently compressed piece. Part of the output format.
    pub(crate) const fn piece_size(self) -> usize {
        match self {
            Format::Gzip => 1 << 20,
            // zstd's own job size for level 3 would be 8 MiB; 4 MiB halves the memory per
            // piece in flight for a negligible loss.
            Format::Zstd => 4 << 20,
        }
    }

    /// Bytes of the previous input a piece is primed with.
    const fn dict_size(self) -> usize {
        match self {
            Format::Gzip => DICT_SIZE,
            Format::Zstd => 0,
        }
    }

    /// Pieces in flight at most: enough to keep every worker busy while the caller waits for
    /// the oldest one. zstd's pieces are four times larger: fewer of them.
    fn window(self, workers: usize) -> u64 {
        match self {
            Format::Gzip => 2 * workers as u64,
            Format::Zstd => workers as u64 + 2,
        }
    }
}

/// One piece to compress.
struct Job {
    index: u64,
    /// The last [`Format::dict_size`] bytes before `data` (empty for the first piece).
    dict: Vec<u8>,
    data: Vec<u8>,
    last: bool,
    /// A buffer for the compressed bytes (recycled).
    out: Vec<u8>,
}

/// One compressed piece.
struct Done {
    index: u64,
    /// The input buffer, handed back for reuse.
    data: Vec<u8>,
    /// The compressed bytes and, for gzip, the CRC-32 of the input.
    result: io::Result<(Vec<u8>, Crc)>,
}

/// A worker's compressor state.
enum Codec {
    Deflate(Box<Deflate>),
    Zstd(Box<Zstd>),
}

struct Zstd {
    main: zstd::bulk::Compressor<'static>,
    /// Level-1 deflate, for the incompressibility trial (the same rule as gzip's pieces).
    trial: Compress,
    trial_out: Vec<u8>,
}

struct Deflate {
    main: Compress,
    /// Level 1, for the incompressibility trial.
    trial: Compress,
    trial_out: Vec<u8>,
}

impl Codec {
    /// A codec at `level` (the codec's own: gzip 0-9, zstd 1-22).
    fn new(format: Format, level: i32) -> io::Result<Codec> {
        Ok(match format {
            Format::Gzip => Codec::Deflate(Box::new(Deflate {
                main: Compress::new(flate2::Compression::new(level.clamp(0, 9) as u32), false),
                trial: Compress::new(flate2::Compression::new(1), false),
                trial_out: Vec::new(),
            })),
            Format::Zstd => {
                let mut main = zstd::bulk::Compressor::new(level)?;
                main.include_checksum(true)?;
                main.include_contentsize(true)?;
                Codec::Zstd(Box::new(Zstd {
                    main,
                    trial: Compress::new(flate2::Compression::new(1), false),
                    trial_out: Vec::new(),
                }))
            }
        })
    }

    /// Compresses one piece into `out` (cleared first); for gzip, returns the CRC of `data`.
    fn piece(
        &mut self,
        dict: &[u8],
        data: &[u8],
        last: bool,
        out: &mut Vec<u8>,
    ) -> io::Result<Crc> {
        let mut crc = Crc::new();
        out.clear();
        match self {
            Codec::Deflate(d) => {
                crc.update(data);
                if incompressible(&mut d.trial, &mut d.trial_out, data)? {
                    stored(data, last, out);
                } else {
                    deflate_piece(&mut d.main, dict, data, last, out)?;
                }
            }
            Codec::Zstd(z) => {
                if incompressible(&mut z.trial, &mut z.trial_out, data)? {
                    raw_frame(data, out);
                } else {
                    out.reserve(zstd::zstd_safe::compress_bound(data.len()));
                    z.main.compress_to_buffer(data, out)?;
                }
            }
        }
        Ok(crc)
    }
}

/// Whether a level-1 trial on [`SAMPLES`] samples of `data` (its first, and evenly spread
/// [`SAMPLE_SIZE`] byte ranges; all of it when smaller) saves less than 1/64 of their size.
/// Depends only on `data`, so the choice is the same on every machine and thread.
fn incompressible(c: &mut Compress, out: &mut Vec<u8>, data: &[u8]) -> io::Result<bool> {
    let mut sampled = 0usize;
    let mut compressed = 0usize;
    let ranges: Vec<&[u8]> = if data.len() <= SAMPLES * SAMPLE_SIZE {
        vec![data]
    } else {
        let step = data.len() / SAMPLES;
        (0..SAMPLES)
            .map(|i| &data[i * step..i * step + SAMPLE_SIZE])
            .collect()
    };
    for sample in ranges {
        if sample.is_empty() {
            continue;
        }
        c.reset();
        out.clear();
        out.reserve(sample.len() + sample.len() / 64 + 64);
        loop {
            let done = c.total_in() as usize;
            let status = c
                .compress_vec(&sample[done..], out, FlushCompress::Finish)
                .map_err(io::Error::other)?;
            if status == Status::StreamEnd {
                break;
            }
            out.reserve(out.capacity() / 4 + 64);
        }
        sampled += sample.len();
        compressed += out.len();
    }
    Ok(sampled > 0 && compressed * 64 >= sampled * 63)
}

/// `data` as stored deflate blocks, byte-aligned as a piece starts; the last one final when
/// `last`.
fn stored(data: &[u8], last: bool, out: &mut Vec<u8>) {
    out.reserve(data.len() + 5 * (data.len() / STORED_MAX + 1));
    if data.is_empty() {
        if last {
            out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
        }
        return;
    }
    let mut blocks = data.chunks(STORED_MAX).peekable();
    while let Some(block) = blocks.next() {
        let is_final = last && blocks.peek().is_none();
        // BFINAL, BTYPE 00, then padding to the byte boundary: one byte.
        out.push(u8::from(is_final));
        let len = block.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
}

/// `data` as one zstd frame of raw blocks (RFC 8878 §3.1.1): the magic number, a header
/// saying single segment with the content size in 4 bytes and no checksum, then blocks of at
/// most 128 KiB, the last one marked.
fn raw_frame(data: &[u8], out: &mut Vec<u8>) {
    const MAGIC: u32 = 0xFD2F_B528;
    const BLOCK_MAX: usize = 128 * 1024;
    // Frame_Content_Size_flag 2 (4 bytes), Single_Segment_flag 1, no checksum, no dictionary.
    const DESCRIPTOR: u8 = 0b1010_0000;
    out.reserve(data.len() + 9 + 3 * (data.len() / BLOCK_MAX + 1));
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(DESCRIPTOR);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    // Block_Header: Last_Block (bit 0), Block_Type 0 = raw (bits 1-2), Block_Size (bits 3-23).
    let header = |size: usize, last: bool| ((size as u32) << 3 | u32::from(last)).to_le_bytes();
    if data.is_empty() {
        out.extend_from_slice(&header(0, true)[..3]);
        return;
    }
    let mut blocks = data.chunks(BLOCK_MAX).peekable();
    while let Some(block) = blocks.next() {
        out.extend_from_slice(&header(block.len(), blocks.peek().is_none())[..3]);
        out.extend_from_slice(block);
    }
}

#[cfg(test)]
pub(crate) fn raw_frame_for_tests(data: &[u8], out: &mut Vec<u8>) {
    raw_frame(data, out)
}

/// Deflates one piece into `out`.
fn deflate_piece(
    c: &mut Compress,
    dict: &[u8],
    data: &[u8],
    last: bool,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    c.reset();
    if !dict.is_empty() {
        c.set_dictionary(dict).map_err(io::Error::other)?;
    }
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    // About deflate's bound for stored data, and room for the flush marker.
    out.reserve(data.len() + data.len() / 64 + 64);
    let start_in = c.total_in();
    loop {
        let consumed = (c.total_in() - start_in) as usize;
        let status = c
            .compress_vec(&data[consumed..], out, flush)
            .map_err(io::Error::other)?;
        let all_in = (c.total_in() - start_in) as usize == data.len();
        match status {
            Status::StreamEnd => return Ok(()),
            // A flush is complete when it left output space unused.
            Status::Ok | Status::BufError if !last && all_in && out.len() < out.capacity() => {
                return Ok(())
            }
            Status::Ok | Status::BufError => out.reserve(out.capacity() / 4 + 64),
        }
    }
}

struct Pool {
    jobs: Option<Sender<Job>>,
    results: Receiver<Done>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    fn start(format: Format, level: i32, workers: usize) -> io::Result<Pool> {
        let (jobs, job_rx) = channel::<Job>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, results) = channel::<Done>();
        let mut pool = Pool {
            jobs: Some(jobs),
            results,
            threads: Vec::with_capacity(workers),
        };
        let name = match format {
            Format::Gzip => "gzip",
            Format::Zstd => "zstd",
        };
        for i in 0..workers {
            let job_rx = Arc::clone(&job_rx);
            let done_tx = done_tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ossb-{name}-{i}"))
                .spawn(move || worker(format, level, &job_rx, &done_tx))?;
            pool.threads.push(thread);
        }
        Ok(pool)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Workers stop once the job channel is closed and drained.
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn worker(format: Format, level: i32, jobs: &Mutex<Receiver<Job>>, done: &Sender<Done>) {
    let mut codec = Codec::new(format, level);
    loop {
        // A poisoned lock only means another worker panicked while waiting: keep going.
        let next = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(mut job) = next else { return };
        let result = match &mut codec {
            Ok(codec) => catch_unwind(AssertUnwindSafe(|| {
                let crc = codec.piece(&job.dict, &job.data, job.last, &mut job.out)?;
                Ok((std::mem::take(&mut job.out), crc))
            }))
            .unwrap_or_else(|_| Err(io::Error::other("the compressor panicked"))),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        };
        if result.is_err() {
            // The compressor may be in any state: start from a new one.
            codec = Codec::new(format, level);
        }
        let reply = Done {
            index: job.index,
            data: job.data,
            result,
        };
        if done.send(reply).is_err() {
            return;
        }
    }
}

/// The parallel encoder. Call [`PieceWriter::finish`] to end the stream; dropping it without
/// finishing stops the workers and leaves the output incomplete.
pub(crate) struct PieceWriter<W: Write> {
    out: W,
    format: Format,
    /// The codec's level (gzip 0-9, zstd 1-22).
    level: i32,
    workers: usize,
    pool: Option<Pool>,
    /// The piece being filled.
    block: Vec<u8>,
    /// The last [`Format::dict_size`] bytes of the previous piece.
    tail: Vec<u8>,
    /// Index of the next piece to hand out, and of the next piece to write.
    next_job: u64,
    next_out: u64,
    /// Pieces compressed ahead of their turn.
    ready: BTreeMap<u64, (Vec<u8>, Crc)>,
    /// Buffers back from the workers, for reuse.
    free_data: Vec<Vec<u8>>,
    free_out: Vec<Vec<u8>>,
    /// CRC and length of everything written so far (gzip).
    crc: Crc,
    header_written: bool,
}

impl<W: Write> PieceWriter<W> {
    /// A writer that compresses on `workers` threads (at least one; started at the first full
    /// piece, so a small stream is compressed on the caller's thread and starts none).
    #[cfg(test)]
    pub(crate) fn new(out: W, format: Format, workers: usize) -> Self {
        let level = match format {
            Format::Gzip => super::GZIP_LEVEL as i32,
            Format::Zstd => super::ZSTD_LEVEL,
        };
        Self::with_level(out, format, level, workers)
    }

    /// As `new`, compressing at the codec's `level` (gzip 0-9, zstd 1-22).
    pub(crate) fn with_level(out: W, format: Format, level: i32, workers: usize) -> Self {
        PieceWriter {
            out,
            format,
            level,
            workers: workers.max(1),
            pool: None,
            block: Vec::with_capacity(format.piece_size()),
            tail: Vec::new(),
            next_job: 0,
            next_out: 0,
            ready: BTreeMap::new(),
            free_data: Vec::new(),
            free_out: Vec::new(),
            crc: Crc::new(),
            header_written: false,
        }
    }

    /// Hands the filled piece to the workers (starting them if needed).
    fn dispatch(&mut self, last: bool) -> io::Result<()> {
        let size = self.format.piece_size();
        let mut next = self
            .free_data
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(size));
        next.clear();
        let data = std::mem::replace(&mut self.block, next);
        let dict_size = self.format.dict_size();
        let mut dict = Vec::with_capacity(dict_size);
        if dict_size > 0 {
            dict.extend_from_slice(&self.tail);
            self.tail.clear();
            self.tail
                .extend_from_slice(&data[data.len().saturating_sub(dict_size)..]);
        }
        let index = self.next_job;
        self.next_job += 1;
        if self.pool.is_none() && last && index == 0 {
            // The whole stream is one piece: no thread is worth starting.
            let mut out = Vec::new();
            let crc = Codec::new(self.format, self.level)?.piece(&dict, &data, true, &mut out)?;
            self.ready.insert(index, (out, crc));
            return self.write_ready();
        }
        if self.pool.is_none() {
            self.pool = Some(Pool::start(self.format, self.level, self.workers)?);
        }
        let job = Job {
            index,
            dict,
            data,
            last,
            out: self.free_out.pop().unwrap_or_default(),
        };
        let sent = self
            .pool
            .as_ref()
            .and_then(|p| p.jobs.as_ref())
            .is_some_and(|jobs| jobs.send(job).is_ok());
        if !sent {
            return Err(io::Error::other("the compression workers stopped"));
        }
        // Take what is done without waiting; wait only when the window is full.
        while self.receive(false)? {}
        while self.next_job - self.next_out >= self.format.window(self.workers) {
            self.receive(true)?;
        }
        Ok(())
    }

    /// Takes one finished piece (waiting for one when `wait`) and writes what is now in order.
    /// Returns whether a piece was taken.
    fn receive(&mut self, wait: bool) -> io::Result<bool> {
        let Some(pool) = &self.pool else {
            return Ok(false);
        };
        let done = if wait {
            match pool.results.recv() {
                Ok(done) => done,
                Err(_) => return Err(io::Error::other("the compression workers stopped")),
            }
        } else {
            match pool.results.try_recv() {
                Ok(done) => done,
                Err(_) => return Ok(false),
            }
        };
        let (out, crc) = done.result?;
        self.free_data.push(done.data);
        self.ready.insert(done.index, (out, crc));
        self.write_ready()?;
        Ok(true)
    }

    /// Writes the pieces that are next in order.
    fn write_ready(&mut self) -> io::Result<()> {
        while let Some((out, crc)) = self.ready.remove(&self.next_out) {
            if !self.header_written && self.format == Format::Gzip {
                self.out.write_all(&header(self.level))?;
            }
            self.header_written = true;
            self.out.write_all(&out)?;
            self.crc.combine(&crc);
            self.next_out += 1;
            self.free_out.push(out);
        }
        Ok(())
    }

    /// Ends the stream: the last piece and, for gzip, the trailer (CRC-32 and length mod
    /// 2^32). Returns the inner writer, not flushed.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.dispatch(true)?;
        while self.next_out < self.next_job {
            self.receive(true)?;
        }
        self.pool = None;
        if self.format == Format::Gzip {
            let mut trailer = [0u8; 8];
            trailer[..4].copy_from_slice(&self.crc.sum().to_le_bytes());
            trailer[4..].copy_from_slice(&self.crc.amount().to_le_bytes());
            self.out.write_all(&trailer)?;
        }
        Ok(self.out)
    }
}

impl<W: Write> Write for PieceWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let size = self.format.piece_size();
        // A full piece is handed out only once more input exists: the last piece is the one
        // `finish` finds, so it alone carries the final block.
        if self.block.len() == size {
            self.dispatch(false)?;
        }
        let n = buf.len().min(size - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    /// Writes out the pieces already compressed; does not cut a piece (that would make the
    /// bytes depend on when flushes happen).
    fn flush(&mut self) -> io::Result<()> {
        while self.receive(false)? {}
        self.out.flush()
    }
}
