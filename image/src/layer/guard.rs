//! A reader between the decompressor and the tar reader that bounds what the tar reader keeps
//! in memory.
//!
//! The `tar` crate reads GNU long names and links (`L`, `K`) and PAX headers (`x`, `g`) whole
//! into memory, for whatever size their header claims. A layer can claim gigabytes there, and a
//! decompression bomb can deliver them from a few megabytes of gzip. This guard follows the tar
//! stream's structure as it passes (headers, data lengths, PAX `size` overrides, GNU sparse
//! extension blocks) and refuses an extension header larger than [`MAX_EXTENSION`] before any
//! of it is read, as Go's archive/tar does (1 MiB). File contents are streamed to disk by the
//! applier, so they need no bound here.

use std::io::{self, Read};

/// The largest GNU long name/link or PAX header accepted.
pub const MAX_EXTENSION: u64 = 1024 * 1024;

const BLOCK: u64 = 512;

enum State {
    /// Collecting the next header block.
    Header,
    /// Inside an entry's data (padded to blocks): how many bytes remain.
    Data { remaining: u64 },
    /// Inside a PAX header's data, kept to find a `size` record for the next entry.
    Pax { remaining: u64, padding: u64 },
    /// GNU sparse extension blocks follow the header.
    SparseExt { data: u64 },
}

/// See the module documentation.
pub struct HeaderGuard<R> {
    inner: R,
    state: State,
    block: Vec<u8>,
    pax: Vec<u8>,
    /// A `size` from a PAX header, for the next entry.
    next_size: Option<u64>,
}

impl<R: Read> HeaderGuard<R> {
    /// Guards `inner`, a decompressed tar stream.
    pub fn new(inner: R) -> HeaderGuard<R> {
        HeaderGuard {
            inner,
            state: State::Header,
            block: Vec::with_capacity(BLOCK as usize),
            pax: Vec::new(),
            next_size: None,
        }
    }

    /// Looks at the bytes that just passed.
    fn observe(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Data { remaining } => {
                    let n = (*remaining).min(bytes.len() as u64);
                    *remaining -= n;
                    bytes = &bytes[n as usize..];
                    if *remaining == 0 {
                        self.state = State::Header;
                    }
                }
                State::Pax { remaining, padding } => {
                    let n = (*remaining).min(bytes.len() as u64) as usize;
                    self.pax.extend_from_slice(&bytes[..n]);
                    *remaining -= n as u64;
                    bytes = &bytes[n..];
                    if *remaining == 0 {
                        let padding = *padding;
                        self.next_size = pax_size(&self.pax).or(self.next_size);
                        self.pax.clear();
                        self.state = if padding > 0 {
                            State::Data { remaining: padding }
                        } else {
                            State::Header
                        };
                    }
                }
                State::Header | State::SparseExt { .. } => {
                    let want = BLOCK as usize - self.block.len();
                    let n = want.min(bytes.len());
                    self.block.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if self.block.len() == BLOCK as usize {
                        let block = std::mem::take(&mut self.block);
                        self.block.reserve(BLOCK as usize);
                        self.on_block(&block)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn on_block(&mut self, block: &[u8]) -> io::Result<()> {
        if let State::SparseExt { data } = self.state {
            // 21 sparse entries, then the "another extension block follows" flag.
            self.state = if block[504] != 0 {
                State::SparseExt { data }
            } else {
                data_state(data)
            };
            return Ok(());
        }
        if block.iter().all(|b| *b == 0) {
            // End-of-archive blocks: stay ready for whatever follows.
            return Ok(());
        }
        let kind = block[156];
        let size = parse_size(&block[124..136]).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "a tar header has an invalid size field",
            )
        })?;
        let extension = matches!(kind, b'L' | b'K' | b'x' | b'g' | b'X');
        if extension && size > MAX_EXTENSION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a tar extension header (type {:?}) claims {size} bytes, more than the {MAX_EXTENSION} allowed: refusing the layer (a decompression bomb or a corrupt layer)",
                    kind as char
                ),
            ));
        }
        let padded = size.div_ceil(BLOCK) * BLOCK;
        if matches!(kind, b'x' | b'X') {
            self.state = State::Pax {
                remaining: size,
                padding: padded - size,
            };
            if size == 0 {
                self.state = State::Header;
            }
            return Ok(());
        }
        // A PAX size applies to the next real entry only.
        let size = if extension {
            size
        } else {
            self.next_size.take().unwrap_or(size)
        };
        let padded = size.div_ceil(BLOCK) * BLOCK;
        // GNU sparse: more header blocks may follow before the data.
        if kind == b'S' && block[482] != 0 {
            self.state = State::SparseExt { data: padded };
            return Ok(());
        }
        // Directories, links and devices carry no data whatever their size field says
        // (the tar crate reads data only for the types that have it, and skips `size` bytes
        // for the others, so follow `size` for every type as it does).
        self.state = data_state(padded);
        Ok(())
    }
}

fn data_state(padded: u64) -> State {
    if padded == 0 {
        State::Header
    } else {
        State::Data { remaining: padded }
    }
}

/// An octal or base-256 size field.
fn parse_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        if field[0] & 0x40 != 0 {
            return None; // negative
        }
        let mut v: u64 = u64::from(field[0] & 0x3f);
        for b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(*b))?;
        }
        return Some(v);
    }
    let text: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(|b| *b != 0 && *b != b' ')
        .collect();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&text).ok()?, 8).ok()
}

/// The `size` record of a PAX header, if any.
fn pax_size(records: &[u8]) -> Option<u64> {
    let mut rest = records;
    let mut found = None;
    while !rest.is_empty() {
        let space = rest.iter().position(|b| *b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
        if len <= space || len > rest.len() {
            return found;
        }
        let record = &rest[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(v) = record.strip_prefix(b"size=") {
            found = std::str::from_utf8(v).ok()?.parse().ok();
        }
        rest = &rest[len..];
    }
    found
}

impl<R: Read> Read for HeaderGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.observe(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u8, name: &str, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_path(name).unwrap();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    /// Counts what is read through it.
    struct Counting<R>(R, std::rc::Rc<std::cell::Cell<u64>>);
    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.read(buf)?;
            self.1.set(self.1.get() + n as u64);
            Ok(n)
        }
    }

    #[test]
    fn a_gigantic_long_name_is_refused_before_it_is_read() {
        for kind in [b'L', b'K', b'x', b'g'] {
            // 8 GiB of zeros behind the header, produced lazily: only what is read exists.
            let read = std::rc::Rc::new(std::cell::Cell::new(0));
            let stream = io::Cursor::new(header(kind, "././@LongLink", 8 << 30))
                .chain(io::repeat(0).take(8 << 30));
            let dir = tempfile::tempdir().unwrap();
            let err = super::super::apply_layer(
                Counting(stream, read.clone()),
                dir.path(),
                &super::super::ApplyOptions::default(),
            )
            .unwrap_err();
            assert!(err.to_string().contains("extension header"), "{err}");
            assert!(
                read.get() < 4 << 20,
                "read {} bytes before refusing",
                read.get()
            );
        }
    }

    #[test]
    fn ordinary_tars_pass_untouched() {
        let mut b = tar::Builder::new(Vec::new());
        let long = "d/".repeat(200) + "file";
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(600);
        h.set_mode(0o644);
        b.append_data(&mut h, "big", &vec![7u8; 600][..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        b.append_data(&mut h, "dir/", &b""[..]).unwrap();
        let bytes = b.into_inner().unwrap();
        let mut out = Vec::new();
        HeaderGuard::new(&bytes[..]).read_to_end(&mut out).unwrap();
        assert_eq!(out, bytes);
    }

    #[test]
    fn pax_size_overrides_are_followed() {
        // A PAX header saying the next entry has 1100 bytes while its ustar size field says 0;
        // then a 2 MiB long name claim that must still be caught after that entry.
        let record = "13 size=1100\n".to_string();
        let mut stream = header(b'x', "pax", record.len() as u64);
        let mut data = record.clone().into_bytes();
        data.resize(512, 0);
        stream.extend(data);
        stream.extend(header(b'0', "file", 0));
        stream.extend(vec![1u8; 1100usize.div_ceil(512) * 512]);
        stream.extend(header(b'L', "././@LongLink", 2 << 20));
        let mut out = Vec::new();
        let err = HeaderGuard::new(&stream[..])
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(err.to_string().contains("2097152"), "{err}");
        assert_eq!(pax_size(record.as_bytes()), Some(1100));
    }

    #[test]
    fn size_fields_in_octal_and_base_256() {
        assert_eq!(parse_size(b"00000001750\0"), Some(1000));
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[11] = 5;
        f[10] = 1;
        assert_eq!(parse_size(&f), Some(261));
        assert_eq!(parse_size(b"           \0"), Some(0));
    }
}
