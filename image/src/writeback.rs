//! A file written front to back and synced at the end (a blob before it is renamed into the
//! store, an exported tarball), whose writeback starts as it grows.
//!
//! The kernel keeps written pages dirty until a tenth of memory is dirty or they are 30 s
//! old, so on a machine with a few GiB free a 1 GiB blob was not on the disk at all when its
//! writer finished: the final `fsync` then wrote the whole of it while the build waited,
//! after the CPU work instead of beside it. Asking for writeback of every few MiB as it is
//! written (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which starts the I/O and does not wait
//! for it) overlaps the two; the `fsync` at the end stays the durability point and has
//! little left to do. On tmpfs it costs nothing (there is no writeback).

use std::io::{self, Write};

/// How much is written between two writeback requests: large enough that the system call
/// is noise, small enough that the disk starts early.
const CHUNK: u64 = 8 * 1024 * 1024;

/// A file whose writeback is started every [`CHUNK`] bytes (see the module documentation).
pub struct WritebackFile<F> {
    file: F,
    /// Bytes written from the start of the file.
    written: u64,
    /// Where the range not yet handed to writeback begins.
    started: u64,
}

impl<F: std::os::fd::AsFd> WritebackFile<F> {
    /// Wraps a file about to be written from its start.
    pub fn new(file: F) -> Self {
        WritebackFile {
            file,
            written: 0,
            started: 0,
        }
    }

    /// The file.
    pub fn get_ref(&self) -> &F {
        &self.file
    }

    /// The file, to write or truncate directly; call [`WritebackFile::rewound`] after a
    /// truncation to the start.
    pub fn get_mut(&mut self) -> &mut F {
        &mut self.file
    }

    /// The file back.
    pub fn into_inner(self) -> F {
        self.file
    }

    /// Notes that the file was truncated to nothing and is written from its start again.
    pub fn rewound(&mut self) {
        self.written = 0;
        self.started = 0;
    }

    /// Counts `n` more bytes written and starts the writeback of a full chunk.
    pub fn wrote(&mut self, n: usize) {
        self.written += n as u64;
        if self.written - self.started >= CHUNK {
            start_writeback(&self.file, self.started, self.written - self.started);
            self.started = self.written;
        }
    }
}

#[cfg(target_os = "linux")]
fn start_writeback(file: &impl std::os::fd::AsFd, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // Best effort: a failure here only means the final fsync does the writing.
    // SAFETY: the descriptor is open for the borrow's duration; the call reads no memory.
    unsafe {
        libc::sync_file_range(
            file.as_fd().as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &impl std::os::fd::AsFd, _offset: u64, _len: u64) {}

impl<F: Write + std::os::fd::AsFd> Write for WritebackFile<F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.wrote(n);
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let n = self.file.write_vectored(bufs)?;
        self.wrote(n);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_written_arrives_whole_across_writeback_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut w = WritebackFile::new(std::fs::File::create(&path).unwrap());
        let piece: Vec<u8> = (0..=255u8).cycle().take(3 * 1024 * 1024 + 7).collect();
        for _ in 0..5 {
            w.write_all(&piece).unwrap();
        }
        let n = w
            .write_vectored(&[io::IoSlice::new(b"ab"), io::IoSlice::new(b"cd")])
            .unwrap();
        assert_eq!(n, 4);
        assert_eq!(
            w.started,
            3 * piece.len() as u64,
            "writeback asked for once 8 MiB were written"
        );
        w.get_ref().sync_all().unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), piece.len() * 5 + 4);
        assert_eq!(&back[..piece.len()], &piece[..]);
        assert_eq!(&back[back.len() - 4..], b"abcd");
    }
}
