//! RPM header blobs, as the rpmdb stores one per installed package: `il` and `dl` (big-endian
//! u32: index entries, data bytes), `il` 16-byte entries (tag, type, offset, count), then the
//! data. No lead and no header magic: the database keeps the bare header.

/// Tags this scanner reads (rpmtag.h).
pub(crate) mod tag {
    pub const NAME: u32 = 1000;
    pub const VERSION: u32 = 1001;
    pub const RELEASE: u32 = 1002;
    pub const EPOCH: u32 = 1003;
    pub const VENDOR: u32 = 1011;
    pub const LICENSE: u32 = 1014;
    pub const PACKAGER: u32 = 1015;
    pub const ARCH: u32 = 1022;
    pub const SOURCERPM: u32 = 1044;
}

const TYPE_INT32: u32 = 4;
const TYPE_STRING: u32 = 6;
const TYPE_STRING_ARRAY: u32 = 8;
const TYPE_I18NSTRING: u32 = 9;
/// rpm's own limits on a header (header.c: hdrchkTags, hdrchkData).
const MAX_ENTRIES: usize = 0xffff;
const MAX_DATA: usize = 256 << 20;
const ENTRY_LEN: usize = 16;

/// A parsed header: the index and the data it points into.
pub(crate) struct Header<'a> {
    entries: Vec<Entry>,
    data: &'a [u8],
}

struct Entry {
    tag: u32,
    ty: u32,
    offset: usize,
    count: u32,
}

fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

impl<'a> Header<'a> {
    /// Checks the counts against the blob and rpm's limits before trusting any offset.
    pub fn parse(blob: &'a [u8]) -> Result<Header<'a>, String> {
        let il = be32(blob, 0).ok_or("shorter than 8 bytes")? as usize;
        let dl = be32(blob, 4).ok_or("shorter than 8 bytes")? as usize;
        if il == 0 || il > MAX_ENTRIES || dl > MAX_DATA {
            return Err(format!("implausible header: {il} entries, {dl} data bytes"));
        }
        let data_start = 8 + il * ENTRY_LEN;
        let data = blob.get(data_start..data_start + dl).ok_or_else(|| {
            format!(
                "{il} entries and {dl} data bytes do not fit in {} bytes",
                blob.len()
            )
        })?;
        let entries = (0..il)
            .filter_map(|i| {
                let at = 8 + i * ENTRY_LEN;
                Some(Entry {
                    tag: be32(blob, at)?,
                    ty: be32(blob, at + 4)?,
                    offset: be32(blob, at + 8)? as usize,
                    count: be32(blob, at + 12)?,
                })
            })
            .collect();
        Ok(Header { entries, data })
    }

    fn entry(&self, tag: u32) -> Option<&Entry> {
        self.entries.iter().find(|e| e.tag == tag)
    }

    /// A string tag's value (the first string of an array or i18n table).
    pub fn string(&self, tag: u32) -> Option<String> {
        let e = self.entry(tag)?;
        if !matches!(e.ty, TYPE_STRING | TYPE_STRING_ARRAY | TYPE_I18NSTRING) || e.count == 0 {
            return None;
        }
        let rest = self.data.get(e.offset..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        let s = String::from_utf8_lossy(&rest[..end]).trim().to_string();
        (!s.is_empty()).then_some(s)
    }

    /// An INT32 tag's first value.
    pub fn int32(&self, tag: u32) -> Option<u32> {
        let e = self.entry(tag)?;
        if e.ty != TYPE_INT32 || e.count == 0 {
            return None;
        }
        be32(self.data, e.offset)
    }
}

/// Writes a header blob from (tag, value) pairs, as rpm lays it out; for tests.
#[cfg(test)]
pub(crate) fn build_for_test(strings: &[(u32, &str)], epoch: Option<u32>) -> Vec<u8> {
    let mut index = Vec::new();
    let mut data = Vec::new();
    let mut entry = |tag: u32, ty: u32, offset: usize| {
        for v in [tag, ty, offset as u32, 1] {
            index.extend_from_slice(&v.to_be_bytes());
        }
    };
    // The immutable region tag rpm puts first: a BIN entry pointing at a trailer; readers skip it.
    entry(63, 7, 0);
    data.extend_from_slice(&[0u8; 16]);
    if let Some(epoch) = epoch {
        entry(tag::EPOCH, TYPE_INT32, data.len());
        data.extend_from_slice(&epoch.to_be_bytes());
    }
    for (tag, value) in strings {
        entry(*tag, TYPE_STRING, data.len());
        data.extend_from_slice(value.as_bytes());
        data.push(0);
    }
    let il = index.len() / ENTRY_LEN;
    let mut blob = Vec::new();
    blob.extend_from_slice(&(il as u32).to_be_bytes());
    blob.extend_from_slice(&(data.len() as u32).to_be_bytes());
    blob.extend_from_slice(&index);
    blob.extend_from_slice(&data);
    blob
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_strings_and_epoch() {
        let blob = build_for_test(&[(tag::NAME, "bash"), (tag::VERSION, "5.2.26")], Some(1));
        let h = Header::parse(&blob).expect("parse");
        assert_eq!(h.string(tag::NAME).as_deref(), Some("bash"));
        assert_eq!(h.string(tag::VERSION).as_deref(), Some("5.2.26"));
        assert_eq!(h.int32(tag::EPOCH), Some(1));
        assert_eq!(h.string(tag::ARCH), None);
        assert_eq!(h.int32(tag::NAME), None, "type checked");
    }

    #[test]
    fn hostile_counts_and_offsets_are_refused() {
        let blob = build_for_test(&[(tag::NAME, "bash")], None);
        for cut in 0..blob.len() {
            // Every truncation either fails to parse or reads nothing past the end.
            if let Ok(h) = Header::parse(&blob[..cut]) {
                let _ = h.string(tag::NAME);
            }
        }
        let mut huge = blob.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Header::parse(&huge).is_err());
        let mut bad_offset = blob.clone();
        // The NAME entry's offset (second entry) points far past the data.
        bad_offset[8 + 16 + 8..8 + 16 + 12].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
        let h = Header::parse(&bad_offset).expect("parse");
        assert_eq!(h.string(tag::NAME), None);
    }
}
