//! A RUN step's output as lines, bounded as BuildKit bounds it: each stream (stdout, stderr)
//! shows at most [`LogLimit`] bytes, then one `[output clipped, log limit 2MiB reached]` line,
//! and the rest is read and dropped. A line is at most [`MAX_LINE`] bytes: a step that prints
//! gigabytes without a newline neither fills the builder's memory nor its log.

use std::sync::OnceLock;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest line passed on; longer ones are split.
pub const MAX_LINE: usize = 64 * 1024;

/// BuildKit's default: 2 MiB per stream and step.
const DEFAULT_LIMIT: u64 = 2 * 1024 * 1024;

/// How much of each output stream of a step is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogLimit(pub Option<u64>);

impl LogLimit {
    /// `BUILDKIT_STEP_LOG_MAX_SIZE` (bytes; `-1` for no limit) as buildkitd reads it, else 2 MiB.
    /// Read once per process: ossb has no daemon, so its own environment is the setting.
    pub fn from_env() -> LogLimit {
        static LIMIT: OnceLock<LogLimit> = OnceLock::new();
        *LIMIT.get_or_init(|| {
            LogLimit::parse(std::env::var("BUILDKIT_STEP_LOG_MAX_SIZE").ok().as_deref())
        })
    }

    /// The limit a `BUILDKIT_STEP_LOG_MAX_SIZE` value gives; as in BuildKit, a value that is
    /// not a number leaves the default.
    pub fn parse(value: Option<&str>) -> LogLimit {
        match value.map(str::trim).map(str::parse::<i64>) {
            Some(Ok(n)) if n < 0 => LogLimit(None),
            Some(Ok(n)) => LogLimit(Some(n as u64)),
            _ => LogLimit(Some(DEFAULT_LIMIT)),
        }
    }

    /// The line shown where output stops, in BuildKit's words.
    fn clipped_line(self) -> String {
        let n = self.0.unwrap_or(0);
        let size = if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
            format!("{}MiB", n >> 20)
        } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
            format!("{}KiB", n >> 10)
        } else {
            format!("{n}B")
        };
        format!("[output clipped, log limit {size} reached]")
    }
}

/// A line as an error message quotes it: the last lines of a failed step are repeated in the
/// error, so each is cut to a few hundred characters.
pub fn clip_for_error(mut line: String) -> String {
    const MAX: usize = 500;
    if line.len() > MAX {
        let mut cut = MAX;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str(" [...]");
    }
    line
}

/// One output stream of a step, read as lines.
pub struct OutputStream<R> {
    reader: R,
    limit: LogLimit,
    buf: Vec<u8>,
    /// Bytes passed on so far.
    shown: u64,
    clipped: bool,
    eof: bool,
}

/// What [`OutputStream::next`] read.
#[derive(Debug, PartialEq, Eq)]
pub enum OutputLine {
    /// A line to show (without its newline).
    Line(String),
    /// A line past the limit: not to be shown, but it may still be the step's last words.
    Hidden(String),
}

impl<R: AsyncRead + Unpin> OutputStream<R> {
    /// Reads `reader` with `limit`.
    pub fn new(reader: R, limit: LogLimit) -> Self {
        OutputStream {
            reader,
            limit,
            buf: Vec::new(),
            shown: 0,
            clipped: false,
            eof: false,
        }
    }

    /// The next line, or `None` at the end of the stream (or when reading fails).
    pub async fn next(&mut self) -> Option<OutputLine> {
        loop {
            if let Some(line) = self.take_line() {
                return Some(self.account(line));
            }
            if self.eof {
                return None;
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.reader.read(&mut chunk).await {
                Ok(0) | Err(_) => self.eof = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// A whole line from the buffer, a [`MAX_LINE`] piece of a longer one, or the rest at the
    /// end of the stream.
    fn take_line(&mut self) -> Option<Vec<u8>> {
        let end = match self.buf.iter().position(|b| *b == b'\n') {
            Some(i) if i <= MAX_LINE => Some((i, i + 1)),
            _ if self.buf.len() >= MAX_LINE => Some((MAX_LINE, MAX_LINE)),
            _ if self.eof && !self.buf.is_empty() => Some((self.buf.len(), self.buf.len())),
            _ => None,
        }?;
        let rest = self.buf.split_off(end.1);
        let mut line = std::mem::replace(&mut self.buf, rest);
        line.truncate(end.0);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Some(line)
    }

    fn account(&mut self, line: Vec<u8>) -> OutputLine {
        let text = String::from_utf8_lossy(&line).into_owned();
        let size = line.len() as u64 + 1;
        match self.limit.0 {
            Some(max) if self.shown + size > max => {
                if self.clipped {
                    OutputLine::Hidden(text)
                } else {
                    // The clip notice replaces the first line that does not fit.
                    self.clipped = true;
                    OutputLine::Line(self.limit.clipped_line())
                }
            }
            _ => {
                self.shown += size;
                OutputLine::Line(text)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(input: Vec<u8>, limit: LogLimit) -> Vec<OutputLine> {
        let mut s = OutputStream::new(&input[..], limit);
        let mut out = Vec::new();
        while let Some(r) = s.next().await {
            out.push(r);
        }
        out
    }

    #[tokio::test]
    async fn output_past_the_limit_is_clipped_once_as_buildkit_says() {
        let input = "0123456789\n".repeat(10).into_bytes();
        let out = read_all(input, LogLimit(Some(35))).await;
        let shown: Vec<&OutputLine> = out
            .iter()
            .filter(|r| matches!(r, OutputLine::Line(_)))
            .collect();
        assert_eq!(shown.len(), 4, "{out:?}");
        assert_eq!(
            shown[3],
            &OutputLine::Line("[output clipped, log limit 35B reached]".into())
        );
        assert_eq!(out.len(), 10, "every line is still read: {out:?}");
        assert_eq!(
            LogLimit(Some(2 << 20)).clipped_line(),
            "[output clipped, log limit 2MiB reached]"
        );
    }

    #[tokio::test]
    async fn a_line_without_end_is_cut_into_pieces() {
        let input = vec![b'x'; MAX_LINE * 2 + 10];
        let out = read_all(input, LogLimit(None)).await;
        let lens: Vec<usize> = out
            .iter()
            .map(|r| match r {
                OutputLine::Line(l) | OutputLine::Hidden(l) => l.len(),
            })
            .collect();
        assert_eq!(lens, vec![MAX_LINE, MAX_LINE, 10]);
    }

    #[test]
    fn the_limit_reads_buildkits_variable() {
        assert_eq!(LogLimit::parse(None), LogLimit(Some(2 << 20)));
        assert_eq!(LogLimit::parse(Some("-1")), LogLimit(None));
        assert_eq!(LogLimit::parse(Some("1024")), LogLimit(Some(1024)));
        assert_eq!(LogLimit::parse(Some("2MiB")), LogLimit(Some(2 << 20)));
    }
}
