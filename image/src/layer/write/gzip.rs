//! A gzip writer that compresses on several threads and gives the same bytes whatever their
//! number.
//!
//! The output is one gzip member holding one deflate stream, cut into independently compressed
//! pieces at fixed offsets of the input (every [`BLOCK_SIZE`] bytes), the layout pigz uses:
//! - each piece is compressed by a fresh level-6 raw deflate compressor primed with the last
//!   32 KiB of the input before it (the deflate window, so matches can still reach back across
//!   the cut, and the ratio stays within a fraction of a percent of one compressor);
//! - every piece but the last ends with a sync flush (an empty stored block: the stream is
//!   byte-aligned there) and no final bit, so the pieces concatenate into one valid deflate
//!   stream; the last one ends with the final block;
//! - the trailer's CRC-32 is the combination of the pieces' CRCs.
//!
//! A piece's bytes depend only on its input, the 32 KiB before it and whether it is the last:
//! not on the thread that compressed it, nor on how the input was split into `write` calls, nor
//! on the number of threads. So the blob is identical for 1, 2 or 4 threads and on every
//! machine, given the pinned flate2 / zlib-rs versions. [`BLOCK_SIZE`], [`DICT_SIZE`] and the
//! level are part of the format: changing them changes every gzip layer digest.
//!
//! Memory is bounded: at most `2 × workers` pieces are in flight (each 1 MiB of input and its
//! compressed bytes), plus the piece being filled; the whole layer is never held.
//!
//! The header is fixed: no file name, mtime 0, XFL 0 (level 6), OS 255 ("unknown"), the header
//! flate2's `GzBuilder` wrote for these layers before.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flate2::{Compress, Crc, FlushCompress, Status};

/// Bytes of input per independently compressed piece. Part of the output format.
pub(crate) const BLOCK_SIZE: usize = 1 << 20;
/// The preset dictionary of a piece: the deflate window, the most a back-reference can reach.
const DICT_SIZE: usize = 32 * 1024;
/// gzip header: magic, CM deflate, FLG none, MTIME 0, XFL 0, OS 255.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];

/// One piece to compress.
struct Job {
    index: u64,
    /// The last [`DICT_SIZE`] bytes before `data` (empty for the first piece).
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
    result: io::Result<(Vec<u8>, Crc)>,
}

struct Pool {
    jobs: Option<Sender<Job>>,
    results: Receiver<Done>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    fn start(workers: usize) -> io::Result<Pool> {
        let (jobs, job_rx) = channel::<Job>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, results) = channel::<Done>();
        let mut pool = Pool {
            jobs: Some(jobs),
            results,
            threads: Vec::with_capacity(workers),
        };
        for i in 0..workers {
            let job_rx = Arc::clone(&job_rx);
            let done_tx = done_tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ossb-gzip-{i}"))
                .spawn(move || worker(&job_rx, &done_tx))?;
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

fn worker(jobs: &Mutex<Receiver<Job>>, done: &Sender<Done>) {
    let mut c = Compress::new(flate2::Compression::new(super::GZIP_LEVEL), false);
    loop {
        // A poisoned lock only means another worker panicked while waiting: keep going.
        let next = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(mut job) = next else { return };
        let result = catch_unwind(AssertUnwindSafe(|| {
            let crc = compress_piece(&mut c, &job.dict, &job.data, job.last, &mut job.out)?;
            Ok((std::mem::take(&mut job.out), crc))
        }))
        .unwrap_or_else(|_| Err(io::Error::other("the gzip compressor panicked")));
        if result.is_err() {
            // The compressor may be in any state: start from a new one.
            c = Compress::new(flate2::Compression::new(super::GZIP_LEVEL), false);
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

/// Compresses one piece into `out` (cleared first) and returns the CRC of `data`.
fn compress_piece(
    c: &mut Compress,
    dict: &[u8],
    data: &[u8],
    last: bool,
    out: &mut Vec<u8>,
) -> io::Result<Crc> {
    let mut crc = Crc::new();
    crc.update(data);
    c.reset();
    if !dict.is_empty() {
        c.set_dictionary(dict).map_err(io::Error::other)?;
    }
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    out.clear();
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
            Status::StreamEnd => return Ok(crc),
            // A flush is complete when it left output space unused.
            Status::Ok | Status::BufError if !last && all_in && out.len() < out.capacity() => {
                return Ok(crc)
            }
            Status::Ok | Status::BufError => out.reserve(out.capacity() / 4 + 64),
        }
    }
}

/// The parallel gzip encoder. Call [`GzipWriter::finish`] to end the stream; dropping it
/// without finishing stops the workers and leaves the output incomplete.
pub(crate) struct GzipWriter<W: Write> {
    out: W,
    workers: usize,
    pool: Option<Pool>,
    /// The piece being filled.
    block: Vec<u8>,
    /// The last [`DICT_SIZE`] bytes of the previous piece.
    tail: Vec<u8>,
    /// Index of the next piece to hand out, and of the next piece to write.
    next_job: u64,
    next_out: u64,
    /// Pieces compressed ahead of their turn.
    ready: BTreeMap<u64, (Vec<u8>, Crc)>,
    /// Buffers back from the workers, for reuse.
    free_data: Vec<Vec<u8>>,
    free_out: Vec<Vec<u8>>,
    /// CRC and length of everything written so far.
    crc: Crc,
    header_written: bool,
}

impl<W: Write> GzipWriter<W> {
    /// A writer that compresses on `workers` threads (at least one; started at the first full
    /// piece, so a small stream is compressed on the caller's thread and starts none).
    pub(crate) fn new(out: W, workers: usize) -> Self {
        GzipWriter {
            out,
            workers: workers.max(1),
            pool: None,
            block: Vec::with_capacity(BLOCK_SIZE),
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

    /// Pieces in flight at most: enough to keep every worker busy while the caller waits for
    /// the oldest one.
    fn window(&self) -> u64 {
        2 * self.workers as u64
    }

    /// Hands the filled piece to the workers (starting them if needed).
    fn dispatch(&mut self, last: bool) -> io::Result<()> {
        let mut next = self
            .free_data
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BLOCK_SIZE));
        next.clear();
        let data = std::mem::replace(&mut self.block, next);
        let mut dict = Vec::with_capacity(DICT_SIZE);
        dict.extend_from_slice(&self.tail);
        self.tail.clear();
        self.tail
            .extend_from_slice(&data[data.len().saturating_sub(DICT_SIZE)..]);
        let index = self.next_job;
        self.next_job += 1;
        if self.pool.is_none() && last && index == 0 {
            // The whole stream is one piece: no thread is worth starting.
            let mut c = Compress::new(flate2::Compression::new(super::GZIP_LEVEL), false);
            let mut out = Vec::new();
            let crc = compress_piece(&mut c, &dict, &data, true, &mut out)?;
            self.ready.insert(index, (out, crc));
            return self.write_ready();
        }
        if self.pool.is_none() {
            self.pool = Some(Pool::start(self.workers)?);
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
            return Err(io::Error::other("the gzip workers stopped"));
        }
        // Take what is done without waiting; wait only when the window is full.
        while self.receive(false)? {}
        while self.next_job - self.next_out >= self.window() {
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
                Err(_) => return Err(io::Error::other("the gzip workers stopped")),
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
            if !self.header_written {
                self.out.write_all(&HEADER)?;
                self.header_written = true;
            }
            self.out.write_all(&out)?;
            self.crc.combine(&crc);
            self.next_out += 1;
            self.free_out.push(out);
        }
        Ok(())
    }

    /// Ends the stream: the last piece, the trailer (CRC-32 and length mod 2^32). Returns the
    /// inner writer, not flushed.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.dispatch(true)?;
        while self.next_out < self.next_job {
            self.receive(true)?;
        }
        self.pool = None;
        let mut trailer = [0u8; 8];
        trailer[..4].copy_from_slice(&self.crc.sum().to_le_bytes());
        trailer[4..].copy_from_slice(&self.crc.amount().to_le_bytes());
        self.out.write_all(&trailer)?;
        Ok(self.out)
    }
}

impl<W: Write> Write for GzipWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // A full piece is handed out only once more input exists: the last piece is the one
        // `finish` finds, so it alone carries the final block.
        if self.block.len() == BLOCK_SIZE {
            self.dispatch(false)?;
        }
        let n = buf.len().min(BLOCK_SIZE - self.block.len());
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
