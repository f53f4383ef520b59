//! A byte stream as a sequence of fixed-size chunks passed from one thread to the next, with a
//! fixed number of buffers in circulation: the tar stream from the thread that reads the
//! rootfs to the one that computes the diff ID and on to the compressor, and the blob from the
//! compressor to the caller's thread, which hashes it and writes it out.
//!
//! Splitting the work this way keeps each stage's critical path short: file reads, the two
//! digests, compression and output run at the same time, and a stage that loses its CPU for a
//! while (a shared machine) is covered by the chunks already queued around it. Memory is
//! bounded by the number of buffers × [`CHUNK_SIZE`] whatever the files' sizes: a producer
//! waits for a buffer to come back before it writes more.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};

/// Bytes per chunk. Every chunk but the last is full; the chunks' boundaries never show in
/// the output (the compressor cuts its own pieces at fixed offsets). 64 KiB chunks measured
/// the same as 1 MiB ones under contention.
pub(super) const CHUNK_SIZE: usize = 1 << 20;
/// Buffers in circulation for the tar stream: enough to keep every stage busy while another
/// is descheduled for a few milliseconds.
pub(super) const CHUNKS: usize = 8;
/// Buffers in circulation for the compressed stream (a third of the tar's size, or less).
pub(super) const BLOB_CHUNKS: usize = 4;

/// One chunk of the tar stream.
pub(super) struct Chunk {
    /// Always [`CHUNK_SIZE`] long (allocated once, never zeroed again); `len` bytes are used.
    pub(super) data: Vec<u8>,
    pub(super) len: usize,
    /// The entry being written when the chunk was started, for error messages downstream.
    pub(super) entry: String,
    /// Whether this is the end of the stream. A stream whose channel closes without it was cut
    /// short by an error upstream and must not be finished.
    pub(super) end: bool,
}

impl Chunk {
    pub(super) fn bytes(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

/// What a stage sees when another stage stopped: that stage reports the cause.
#[derive(Debug)]
struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the layer pipeline stopped")
    }
}

impl std::error::Error for Stopped {}

pub(super) fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, Stopped)
}

/// Whether `e` only says that another stage stopped.
pub(super) fn is_stopped(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Stopped>())
}

/// Fills chunks with the tar stream and hands them on.
pub(super) struct ChunkWriter {
    current: Option<Chunk>,
    allocated: usize,
    /// The most buffers this writer allocates.
    buffers: usize,
    full: SyncSender<Chunk>,
    free: Receiver<Chunk>,
    /// The entry being written now.
    entry: String,
}

impl ChunkWriter {
    /// Sends full chunks to `full`; takes buffers back from `free`; allocates at most
    /// `buffers` (at least 1).
    pub(super) fn new(full: SyncSender<Chunk>, free: Receiver<Chunk>, buffers: usize) -> Self {
        ChunkWriter {
            current: None,
            allocated: 0,
            buffers: buffers.max(1),
            full,
            free,
            entry: String::new(),
        }
    }

    /// Names the entry whose bytes come next.
    pub(super) fn set_entry(&mut self, entry: &str) {
        self.entry.clear();
        self.entry.push_str(entry);
    }

    /// The chunk being filled, with room for at least one byte.
    fn room(&mut self) -> io::Result<&mut Chunk> {
        if self.current.as_ref().is_some_and(|c| c.len == CHUNK_SIZE) {
            let full = self.current.take().expect("checked above");
            self.full.send(full).map_err(|_| stopped())?;
        }
        if self.current.is_none() {
            let mut chunk = match self.free.try_recv() {
                Ok(chunk) => chunk,
                Err(TryRecvError::Empty) if self.allocated < self.buffers => {
                    self.allocated += 1;
                    Chunk {
                        data: vec![0; CHUNK_SIZE],
                        len: 0,
                        entry: String::new(),
                        end: false,
                    }
                }
                // Every buffer is downstream: wait for one (this is what bounds read-ahead).
                Err(TryRecvError::Empty) => self.free.recv().map_err(|_| stopped())?,
                Err(TryRecvError::Disconnected) => return Err(stopped()),
            };
            // The empty end-of-stream chunk has no buffer of its own.
            chunk.data.resize(CHUNK_SIZE, 0);
            chunk.len = 0;
            chunk.end = false;
            chunk.entry.clear();
            chunk.entry.push_str(&self.entry);
            self.current = Some(chunk);
        }
        Ok(self.current.as_mut().expect("set above"))
    }

    /// Reads at most `max` bytes of `file` straight into the chunk (no intermediate copy).
    /// The outer error is the pipeline's; the inner result is the read's: the number of bytes
    /// read, 0 at the end of the file.
    pub(super) fn read_from(&mut self, file: &mut File, max: u64) -> io::Result<io::Result<usize>> {
        let chunk = self.room()?;
        let want = (CHUNK_SIZE - chunk.len).min(usize::try_from(max).unwrap_or(usize::MAX));
        let read = file.read(&mut chunk.data[chunk.len..chunk.len + want]);
        if let Ok(n) = read {
            chunk.len += n;
        }
        Ok(read)
    }

    /// Sends the last chunk (possibly empty), marked as the end of the stream.
    pub(super) fn finish(mut self) -> io::Result<()> {
        if self.current.as_ref().is_some_and(|c| c.len == CHUNK_SIZE) {
            let full = self.current.take().expect("checked above");
            self.full.send(full).map_err(|_| stopped())?;
        }
        let mut last = match self.current.take() {
            Some(chunk) => chunk,
            None => Chunk {
                data: Vec::new(),
                len: 0,
                entry: self.entry.clone(),
                end: false,
            },
        };
        last.end = true;
        self.full.send(last).map_err(|_| stopped())
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let chunk = self.room()?;
        let n = buf.len().min(CHUNK_SIZE - chunk.len);
        chunk.data[chunk.len..chunk.len + n].copy_from_slice(&buf[..n]);
        chunk.len += n;
        Ok(n)
    }

    /// Chunks are sent when full (or at the end): their boundaries never depend on flushes.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
