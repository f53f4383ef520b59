//! Length-prefixed framing of [`Envelope`]s on a byte stream.
//!
//! A frame is a 4-byte big-endian length, then that many bytes of postcard-encoded
//! [`Envelope`]. Frames longer than [`MAX_FRAME_LEN`] are refused before anything is buffered,
//! and every decoding failure is an error value, never a panic. This module only turns values
//! into bytes and back; reading and writing streams is the transport's job (`ossb-net`).

use crate::wire::{Envelope, VERSION};

/// The size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// The largest frame body accepted (a `Has` of 65 536 digests is about 2.1 MiB).
pub const MAX_FRAME_LEN: usize = 4 << 20;

/// Why bytes are not a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix announces more than [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes announced; at most {MAX_FRAME_LEN} are accepted")]
    TooLong(usize),
    /// The sender speaks another protocol version.
    #[error("peer speaks protocol version {theirs}, this node speaks {VERSION}: run the same ossb version on every node")]
    Version {
        /// The sender's version.
        theirs: u16,
    },
    /// The body is not a valid message of this version.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Encodes `envelope` as one frame (prefix and body).
pub fn encode(envelope: &Envelope) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; HEADER_LEN];
    let mut out = postcard::to_extend(envelope, std::mem::take(&mut out))
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLong(len));
    }
    out[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// The body length a frame's prefix announces, checked against [`MAX_FRAME_LEN`].
pub fn body_len(header: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLong(len));
    }
    Ok(len)
}

/// Decodes a frame body (without its prefix). The version is checked before the message, so
/// a peer of another version is told so instead of getting a decoding error.
pub fn decode(body: &[u8]) -> Result<Envelope, FrameError> {
    let (theirs, _) =
        postcard::take_from_bytes::<u16>(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if theirs != VERSION {
        return Err(FrameError::Version { theirs });
    }
    let (envelope, rest) = postcard::take_from_bytes::<Envelope>(body)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} bytes after the message",
            rest.len()
        )));
    }
    Ok(envelope)
}

/// Splits frames out of bytes that arrive in arbitrary pieces.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Appends bytes as they arrived.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. After an error the
    /// stream is unusable (the frame boundary is lost).
    pub fn next_frame(&mut self) -> Result<Option<Envelope>, FrameError> {
        let Some(header) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = body_len(*header)?;
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let envelope = decode(&self.buf[HEADER_LEN..HEADER_LEN + len]);
        self.buf.drain(..HEADER_LEN + len);
        envelope.map(Some)
    }

    /// Bytes received but not yet part of a returned frame (e.g. blob bytes after a header).
    pub fn into_remainder(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::*;
    use crate::Digest;

    fn samples() -> Vec<Envelope> {
        let d = Digest::of(b"blob");
        [
            Message::CacheRequest(CacheRequest::Has {
                digests: vec![d, Digest::of(b"other")],
            }),
            Message::CacheRequest(CacheRequest::Get {
                digest: d,
                offset: 1 << 40,
                local_only: true,
                claim: true,
            }),
            Message::CacheReply(CacheReply::Fetch { from: 7 }),
            Message::CacheRequest(CacheRequest::Put {
                digest: d,
                size: 12,
                from: 3,
            }),
            Message::CacheRequest(CacheRequest::Stat),
            Message::CacheReply(CacheReply::Has {
                sizes: vec![Some(3), None],
            }),
            Message::CacheReply(CacheReply::Blob {
                size: 10,
                offset: 4,
            }),
            Message::CacheReply(CacheReply::Stats(CacheStats {
                blobs: 1,
                bytes: u64::MAX,
                ..CacheStats::default()
            })),
            Message::Error(ErrorReply {
                code: ErrorCode::DigestMismatch,
                message: "no".into(),
            }),
        ]
        .into_iter()
        .map(Envelope::new)
        .collect()
    }

    #[test]
    fn frames_round_trip_whole_and_in_pieces() {
        let mut stream = Vec::new();
        for e in samples() {
            let frame = encode(&e).unwrap();
            assert_eq!(decode(&frame[HEADER_LEN..]).unwrap(), e);
            stream.extend_from_slice(&frame);
        }
        stream.extend_from_slice(b"raw blob bytes");
        // One byte at a time: every frame comes out once, in order, and the raw bytes after
        // the last frame are left over.
        let mut decoder = Decoder::new();
        let mut out = Vec::new();
        for b in &stream {
            decoder.push(std::slice::from_ref(b));
            while let Some(e) = decoder.next_frame().unwrap() {
                out.push(e);
            }
            if out.len() == samples().len() {
                break;
            }
        }
        assert_eq!(out, samples());
    }

    #[test]
    fn digests_travel_as_32_raw_bytes() {
        let e = Envelope::new(Message::CacheRequest(CacheRequest::Has {
            digests: vec![Digest::of(b"x")],
        }));
        // version, variant, variant, length, 32 bytes
        assert_eq!(encode(&e).unwrap().len(), HEADER_LEN + 1 + 1 + 1 + 1 + 32);
    }

    #[test]
    fn refuses_garbage_without_panicking() {
        // Every prefix and many corruptions of valid frames, and pseudo-random bytes.
        let mut inputs: Vec<Vec<u8>> = Vec::new();
        for e in samples() {
            let frame = encode(&e).unwrap();
            for cut in 0..frame.len() {
                inputs.push(frame[HEADER_LEN.min(cut)..cut].to_vec());
            }
            for i in HEADER_LEN..frame.len() {
                for flip in [0x01, 0x80, 0xff] {
                    let mut f = frame.clone();
                    f[i] ^= flip;
                    inputs.push(f[HEADER_LEN..].to_vec());
                }
            }
        }
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        for len in 0..2000 {
            let mut v = Vec::new();
            for _ in 0..len % 97 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(x as u8);
            }
            inputs.push(v);
        }
        for input in &inputs {
            let _ = decode(input);
            let mut d = Decoder::new();
            d.push(input);
            let _ = d.next_frame();
        }
        assert!(decode(&[]).is_err());
        // The current version (a one-byte varint below 128), then no valid message.
        assert!(matches!(
            decode(&[VERSION as u8, 0xff]),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_oversized_frames_and_other_versions() {
        let huge = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        assert_eq!(body_len(huge), Err(FrameError::TooLong(MAX_FRAME_LEN + 1)));
        let mut d = Decoder::new();
        d.push(&u32::MAX.to_be_bytes());
        assert!(matches!(d.next_frame(), Err(FrameError::TooLong(_))));
        let future = Envelope {
            version: VERSION + 1,
            message: Message::CacheRequest(CacheRequest::Stat),
        };
        let frame = encode(&future).unwrap();
        assert_eq!(
            decode(&frame[HEADER_LEN..]),
            Err(FrameError::Version {
                theirs: VERSION + 1
            })
        );
        // Trailing bytes inside a frame are refused.
        let mut frame = encode(&Envelope::new(Message::CacheRequest(CacheRequest::Stat))).unwrap();
        frame.push(0);
        assert!(decode(&frame[HEADER_LEN..]).is_err());
    }
}
