//! Progress events of a build. The coordinator emits them; the CLI renders them.

use std::time::Duration;

/// Something that happened during a build.
#[derive(Clone, Debug)]
pub enum Event {
    /// A vertex (a step, a pull, an export) started.
    Started {
        /// Sequence number, as in BuildKit's `#N`.
        id: usize,
        /// What it is, e.g. `[1/4] RUN make`.
        name: String,
    },
    /// A line of output from a running vertex.
    Output {
        /// The vertex.
        id: usize,
        /// Time since the vertex started.
        elapsed: Duration,
        /// The line.
        line: String,
    },
    /// A vertex finished.
    Done {
        /// The vertex.
        id: usize,
        /// How long it took.
        elapsed: Duration,
    },
    /// A vertex failed; the build error follows.
    Failed {
        /// The vertex.
        id: usize,
        /// How long it ran.
        elapsed: Duration,
        /// The error, one line.
        message: String,
    },
    /// A step whose result came from the cache.
    Cached {
        /// The vertex.
        id: usize,
    },
    /// Why a step runs although a previous build had a step at its position
    /// ([`crate::cache_miss`]): sent before its output, after `Started`.
    CacheMiss {
        /// The vertex.
        id: usize,
        /// The first input that changed (`context file src/a.txt changed`, `build arg V
        /// changed`, `parent step ran`, ...), or `no previous build of this step`.
        reason: String,
    },
    /// The estimated time until the build is done, from the durations of the same steps in
    /// earlier builds; sent at the start and after every step.
    Estimate {
        /// Steps that change files, in all.
        steps: usize,
        /// Those finished (run or cached).
        finished: usize,
        /// Time still expected, when every remaining step ran before.
        remaining: Option<Duration>,
    },
    /// A message about the build as a whole.
    Info(String),
    /// Blob bytes a pull or push vertex has moved so far: sent every half second while it
    /// runs, and when it ends.
    Transfer {
        /// The vertex.
        id: usize,
        /// Bytes received (pulls).
        received: u64,
        /// Bytes sent (pushes).
        sent: u64,
    },
}

/// Receives the events of a build.
pub trait Progress: Send + Sync {
    /// Handles one event; must not block for long.
    fn event(&self, event: Event);
}
