//! Executables: finds the sections that record what went into a binary (Go's
//! `.go.buildinfo`, cargo-auditable's `.dep-v0`) and hands them to their parsers.
//!
//! Only the ELF header, the section headers, their name table and the wanted sections are
//! read, through `object`'s read cache: a 300 MiB Go binary costs a few KiB of reads, never
//! its symbol table.

use std::fs::File;
use std::io::Read;

use object::elf::{FileHeader32, FileHeader64, PF_W, PT_LOAD};
use object::read::elf::{FileHeader, ProgramHeader, SectionHeader};
use object::read::ReadCache;
use object::Endianness;

use crate::package::Findings;
use crate::rootfs::FileEntry;
use crate::{auditable, gobuild};

/// Larger files are not read: no real executable is this large, and a hostile image must not
/// make us read gigabytes.
pub(crate) const BINARY_LIMIT: u64 = 512 << 20;
/// A build info or dependency section larger than this is not what it claims to be.
const SECTION_LIMIT: u64 = 64 << 20;
/// Go looks for its build info in the first 64 KiB of the data segment when the section
/// headers are gone.
const SEGMENT_SEARCH: u64 = 64 << 10;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// Whether the walk should look inside this file: a regular file someone may execute, large
/// enough for an ELF header, small enough to read.
pub(crate) fn is_candidate(entry: &FileEntry) -> bool {
    wants(entry.mode, entry.size)
}

/// [`is_candidate`] by a file's permission bits and size.
pub(crate) fn wants(mode: u32, size: u64) -> bool {
    mode & 0o111 != 0 && (52..=BINARY_LIMIT).contains(&size)
}

/// Scans one candidate executable; files that are not ELF are passed over silently.
pub(crate) fn scan(entry: &FileEntry, findings: &mut Findings) {
    let rel = entry.rel;
    let mut file = match entry.open() {
        Ok(f) => f,
        Err(e) => return findings.warn(rel, format!("cannot open: {e}")),
    };
    let mut magic = [0u8; 5];
    if file.read_exact(&mut magic).is_err() || &magic[..4] != ELF_MAGIC {
        return;
    }
    let cache = ReadCache::new(file);
    let sections = match magic[4] {
        object::elf::ELFCLASS32 => read_sections::<FileHeader32<Endianness>>(&cache),
        object::elf::ELFCLASS64 => read_sections::<FileHeader64<Endianness>>(&cache),
        class => Err(format!("unknown ELF class {class}")),
    };
    let sections = match sections {
        Ok(s) => s,
        Err(e) => return findings.warn(rel, format!("not a readable ELF file: {e}")),
    };
    if let Some(data) = sections.go_buildinfo {
        gobuild::scan(rel, &data, findings);
    }
    if let Some(data) = sections.dep_v0 {
        auditable::scan(rel, &data, findings);
    }
}

#[derive(Default)]
struct Sections {
    go_buildinfo: Option<Vec<u8>>,
    dep_v0: Option<Vec<u8>>,
}

fn read_sections<Elf: FileHeader<Endian = Endianness>>(
    data: &ReadCache<File>,
) -> Result<Sections, String> {
    let header = Elf::parse(data).map_err(|e| e.to_string())?;
    let endian = header.endian().map_err(|e| e.to_string())?;
    let table = header.sections(endian, data).map_err(|e| e.to_string())?;
    let section = |name: &[u8]| -> Result<Option<Vec<u8>>, String> {
        let Some((_, sh)) = table.section_by_name(endian, name) else {
            return Ok(None);
        };
        let size: u64 = sh.sh_size(endian).into();
        if size > SECTION_LIMIT {
            return Err(format!(
                "section {} of {size} bytes is larger than {SECTION_LIMIT}",
                String::from_utf8_lossy(name)
            ));
        }
        let bytes = sh.data(endian, data).map_err(|e| e.to_string())?;
        Ok(Some(bytes.to_vec()))
    };
    let mut found = Sections {
        go_buildinfo: section(b".go.buildinfo")?,
        dep_v0: section(b".dep-v0")?,
    };
    if found.go_buildinfo.is_none() && table.is_empty() {
        found.go_buildinfo = writable_segment_start(header, endian, data)?;
    }
    Ok(found)
}

/// The start of the first writable loaded segment, where Go's linker puts the build info;
/// read only when the section headers were stripped.
fn writable_segment_start<Elf: FileHeader<Endian = Endianness>>(
    header: &Elf,
    endian: Endianness,
    data: &ReadCache<File>,
) -> Result<Option<Vec<u8>>, String> {
    let segments = header
        .program_headers(endian, data)
        .map_err(|e| e.to_string())?;
    let Some(segment) = segments
        .iter()
        .find(|p| p.p_type(endian) == PT_LOAD && p.p_flags(endian) & PF_W != 0)
    else {
        return Ok(None);
    };
    let (offset, size) = segment.file_range(endian);
    let len = size.min(SEGMENT_SEARCH);
    let start = object::ReadRef::read_bytes_at(data, offset, len)
        .map_err(|()| "writable segment outside the file".to_string())?;
    if !start
        .windows(gobuild::MAGIC.len())
        .any(|w| w == gobuild::MAGIC)
    {
        return Ok(None);
    }
    // The build info's strings may run past the first 64 KiB: take the segment up to the limit.
    let len = size.min(SECTION_LIMIT);
    let bytes = object::ReadRef::read_bytes_at(data, offset, len)
        .map_err(|()| "writable segment outside the file".to_string())?;
    Ok(Some(bytes.to_vec()))
}
