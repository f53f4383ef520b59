//! Progress display: BuildKit's plain format (`#N name`, `#N 0.123 output`, `#N DONE 0.4s`,
//! with the bytes a pull or push moved), the same lines with a live status block at the bottom
//! on a terminal (elapsed time, steps done, the estimate from earlier builds, and every running
//! step with its time and bytes), or one JSON object per event.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;

use ossb_engine::{BuildError, BuildRequest, BuildResult, Event, Progress};

use crate::args::{Extras, ProgressMode};

/// Logging for a build shown as `mode`, filtered by `OSSB_LOG` (default `warn`): to stderr,
/// coloured only on a terminal (a CI log or `kubectl logs` gets plain text); with `--progress
/// json` every log line is a JSON object on stdout beside the progress events, so a log
/// collector reads one stream of JSON lines.
pub fn init_build_logging(mode: ProgressMode) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OSSB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = if mode == ProgressMode::Json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stdout)
            .try_init()
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .try_init()
    };
}

/// A line about the build that is not a step's (which isolation was chosen): an `info` event
/// with `--progress json`, else a line on stderr.
pub fn notice(mode: ProgressMode, text: &str) {
    match mode {
        ProgressMode::Json => Json.event(Event::Info(text.to_string())),
        ProgressMode::Quiet => {}
        _ => eprintln!("{text}"),
    }
}

/// Reports an error that ends the command before or after the build: a JSON event with
/// `--progress json`, else `error: ...` on stderr. Returns `code` as the exit code.
pub fn fail(mode: ProgressMode, message: &str, code: u8) -> ExitCode {
    if mode == ProgressMode::Json {
        Json.error(message, code);
    } else {
        eprintln!("error: {message}");
    }
    ExitCode::from(code)
}

/// A build in progress, borrowing the request and the display.
pub type BuildFuture<'b> = Pin<Box<dyn Future<Output = Result<BuildResult, BuildError>> + 'b>>;

/// Runs a build (local or on a cluster) on a fresh runtime with the display `extras` asks for,
/// then writes `--iidfile`/`--metadata-file` and the summary, or the error; returns the exit
/// code (0, 1, or 2 for bad usage or a bad Dockerfile).
pub fn run_to_exit(
    request: &BuildRequest,
    extras: &Extras,
    build: impl for<'b> FnOnce(&'b BuildRequest, &'b dyn Display) -> BuildFuture<'b>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fail(
                extras.progress,
                &format!("cannot start the async runtime: {e}"),
                1,
            )
        }
    };
    let display = for_mode(extras.progress);
    let misses = MissLog::default();
    let display = &Logged {
        inner: display.as_ref(),
        log: &misses,
    };
    let started = std::time::Instant::now();
    let outcome = runtime.block_on(async {
        tokio::select! {
            result = build(request, display) => Ok(result),
            signal = stop_signal() => Err(signal),
        }
    });
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err((name, number)) => {
            // The build's future is gone: its work directory is removed, its steps are killed
            // with their sandbox (which dies with this process); nothing was tagged unless the
            // push had already reached its tags.
            display.finish();
            let code = fail(
                extras.progress,
                &format!("stopped by {name}: the build did not finish"),
                128 + number,
            );
            // Blocking work still under way (an unpack, a layer) is not waited for.
            runtime.shutdown_background();
            return code;
        }
    };
    match outcome {
        Ok(result) => {
            if let Err(e) = extras.write_files(request, &result, &misses.misses()) {
                return fail(extras.progress, &e.to_string(), 1);
            }
            if request.outputs.is_empty() {
                display.event(Event::Info(NO_OUTPUT.into()));
            }
            display.summary(&result, started.elapsed());
            ExitCode::SUCCESS
        }
        Err(e) => {
            display.finish();
            fail(
                extras.progress,
                &e.to_string(),
                u8::try_from(e.exit_code()).unwrap_or(1),
            )
        }
    }
}

/// What a build with no output says, as buildx warns: where the result is and how to get it.
const NO_OUTPUT: &str = "warning: no output was asked for, so the image is only in the build cache: build again with --push --tag REF, --output type=oci,dest=FILE or --output type=docker,dest=FILE to get it (the steps come from the cache)";

/// Waits for SIGINT or SIGTERM (a Ctrl-C, a pod being deleted) and names it, with its number.
pub(crate) async fn stop_signal() -> (&'static str, u8) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // Without handlers the default action (exit) applies: nothing to wait for here.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => ("SIGINT", 2),
        _ = term.recv() => ("SIGTERM", 15),
    }
}

/// A step that ran although an earlier build had a step at its position, and why: what
/// `--metadata-file` lists under `ossb.cache-misses`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheMiss {
    /// The step as its vertex is named (`[stage-0 2/3] RUN make`).
    pub step: String,
    /// The engine's reason (`context file src/a.txt changed`, `parent step ran`, ...).
    pub reason: String,
}

/// The cache misses of the events it sees, with their steps' names (local and cluster
/// builds alike: a cluster's events carry the reasons its workers found).
#[derive(Default)]
pub struct MissLog {
    names: Mutex<std::collections::HashMap<usize, String>>,
    misses: Mutex<Vec<CacheMiss>>,
}

impl MissLog {
    /// Notes a vertex's name or a cache miss.
    pub fn see(&self, event: &Event) {
        match event {
            Event::Started { id, name } => {
                self.names
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(*id, name.clone());
            }
            Event::CacheMiss { id, reason } => {
                let step = self
                    .names
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(id)
                    .cloned()
                    .unwrap_or_default();
                self.misses
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(CacheMiss {
                        step,
                        reason: reason.clone(),
                    });
            }
            _ => {}
        }
    }

    /// `[{"step": ..., "reason": ...}, ...]`, for `--metadata-file`.
    pub fn json(misses: &[CacheMiss]) -> serde_json::Value {
        misses
            .iter()
            .map(|m| serde_json::json!({"step": m.step, "reason": m.reason}))
            .collect()
    }

    /// The misses seen, in the order they came.
    pub fn misses(&self) -> Vec<CacheMiss> {
        self.misses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A display whose events a [`MissLog`] sees on their way.
struct Logged<'a> {
    inner: &'a dyn Display,
    log: &'a MissLog,
}

impl Progress for Logged<'_> {
    fn event(&self, event: Event) {
        self.log.see(&event);
        self.inner.event(event);
    }
}

impl Display for Logged<'_> {
    fn summary(&self, result: &BuildResult, elapsed: Duration) {
        self.inner.summary(result, elapsed);
    }

    fn finish(&self) {
        self.inner.finish();
    }
}

/// A progress sink that can also print the closing summary.
pub trait Display: Progress {
    /// Prints what was built.
    fn summary(&self, result: &BuildResult, elapsed: Duration);

    /// Clears anything drawn in place (the tty status line) before an error is printed.
    fn finish(&self) {}
}

/// The display for `mode`: `auto` is tty on a terminal and plain otherwise (so `kubectl logs`
/// reads well).
pub fn for_mode(mode: ProgressMode) -> Box<dyn Display> {
    let plain = || Plain {
        last: Mutex::new(None),
        transfers: Mutex::new(Default::default()),
    };
    match mode {
        ProgressMode::Json => Box::new(Json),
        ProgressMode::Quiet => Box::new(Quiet),
        ProgressMode::Plain => Box::new(plain()),
        ProgressMode::Auto if !std::io::stderr().is_terminal() => Box::new(plain()),
        ProgressMode::Auto | ProgressMode::Tty => Box::new(Tty::start(plain())),
    }
}

/// Plain lines above a status line that is redrawn in place.
struct Tty {
    inner: std::sync::Arc<TtyInner>,
}

struct TtyInner {
    plain: Plain,
    state: Mutex<TtyState>,
}

struct TtyState {
    started: std::time::Instant,
    running: std::collections::BTreeMap<usize, (String, std::time::Instant)>,
    steps: usize,
    finished: usize,
    /// The estimate and when it was made.
    remaining: Option<(Duration, std::time::Instant)>,
    done: bool,
    /// Lines of the status block on the screen now.
    drawn: usize,
}

/// Running steps listed in the status block; more are counted.
const MAX_RUNNING_SHOWN: usize = 8;

impl Tty {
    fn start(plain: Plain) -> Tty {
        let inner = std::sync::Arc::new(TtyInner {
            plain,
            state: Mutex::new(TtyState {
                started: std::time::Instant::now(),
                running: Default::default(),
                steps: 0,
                finished: 0,
                remaining: None,
                done: false,
                drawn: 0,
            }),
        });
        let weak = std::sync::Arc::downgrade(&inner);
        // Redraws the status line so elapsed times move while a step is quiet.
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200));
            match weak.upgrade() {
                Some(inner) if !inner.lock().done => inner.redraw(None),
                _ => return,
            }
        });
        Tty { inner }
    }
}

impl TtyInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, TtyState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Prints `line` (if any) above the status block, then redraws the block: the build's
    /// time, steps and estimate, then each running step with its time and bytes moved.
    fn redraw(&self, line: Option<(Option<usize>, String)>) {
        let mut state = self.lock();
        let mut err = std::io::stderr().lock();
        // Back to the block's first line, and clear from there down.
        if state.drawn > 1 {
            let _ = write!(err, "\x1b[{}A", state.drawn - 1);
        }
        let _ = write!(err, "\r\x1b[J");
        drop(err);
        state.drawn = 0;
        if let Some((id, text)) = line {
            self.plain.print(id, &text);
        }
        if state.done {
            return;
        }
        let mut lines = Vec::new();
        let mut header = format!(
            "[+] Building {:.1}s ({}/{})",
            state.started.elapsed().as_secs_f64(),
            state.finished,
            state.steps
        );
        if let Some((remaining, at)) = state.remaining {
            let left = remaining.saturating_sub(at.elapsed());
            header.push_str(&format!(" ETA {:.0}s", left.as_secs_f64().ceil()));
        }
        lines.push(header);
        let transfers = self.plain.transfers();
        for (id, (name, since)) in state.running.iter().take(MAX_RUNNING_SHOWN) {
            let mut row = format!(" => #{id} {name} {:.1}s", since.elapsed().as_secs_f64());
            if let Some(t) = transfers.get(id) {
                row.push_str(&format!(" {}", t.short()));
            }
            lines.push(row);
        }
        if state.running.len() > MAX_RUNNING_SHOWN {
            lines.push(format!(
                " => and {} more",
                state.running.len() - MAX_RUNNING_SHOWN
            ));
        }
        let width = terminal_width().saturating_sub(1);
        let text: Vec<String> = lines
            .iter()
            .map(|l| l.chars().take(width).collect())
            .collect();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "{}", text.join("\n"));
        let _ = err.flush();
        state.drawn = text.len();
    }
}

/// The terminal's width in columns (80 when it cannot be told).
fn terminal_width() -> usize {
    // SAFETY: TIOCGWINSZ fills the winsize struct we own.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 {
        ws.ws_col as usize
    } else {
        80
    }
}

impl Progress for Tty {
    fn event(&self, event: Event) {
        let line = {
            let mut state = self.inner.lock();
            match &event {
                Event::Started { id, name } => {
                    state
                        .running
                        .insert(*id, (name.clone(), std::time::Instant::now()));
                }
                Event::Done { id, .. } | Event::Failed { id, .. } | Event::Cached { id } => {
                    state.running.remove(id);
                }
                Event::Estimate {
                    steps,
                    finished,
                    remaining,
                } => {
                    state.steps = *steps;
                    state.finished = *finished;
                    state.remaining = remaining.map(|r| (r, std::time::Instant::now()));
                }
                _ => {}
            }
            match event {
                Event::Estimate { .. } => None,
                Event::Transfer { id, received, sent } => {
                    self.inner.plain.record(id, received, sent);
                    None
                }
                other => Some(other),
            }
        };
        match line {
            Some(event) => {
                // The plain text of the event, printed above the status block.
                let text = self.inner.plain.text(&event);
                let id = event_id(&event);
                self.inner.redraw(Some((id, text)));
            }
            None => self.inner.redraw(None),
        }
    }
}

impl Tty {
    /// Stops drawing and clears the status block.
    fn close(&self) {
        self.inner.lock().done = true;
        self.inner.redraw(None);
        let _ = std::io::stderr().flush();
    }
}

impl Display for Tty {
    fn finish(&self) {
        self.close();
    }

    fn summary(&self, result: &BuildResult, elapsed: Duration) {
        self.close();
        self.inner.plain.summary(result, elapsed);
    }
}

impl Drop for Tty {
    fn drop(&mut self) {
        self.close();
    }
}

fn event_id(event: &Event) -> Option<usize> {
    match event {
        Event::Started { id, .. }
        | Event::Output { id, .. }
        | Event::Done { id, .. }
        | Event::Failed { id, .. }
        | Event::Cached { id }
        | Event::CacheMiss { id, .. }
        | Event::Transfer { id, .. } => Some(*id),
        Event::Estimate { .. } | Event::Info(_) => None,
    }
}

/// An event as a plain line (BuildKit's plain format).
fn plain_text(event: &Event) -> String {
    match event {
        Event::Started { id, name } => format!("#{id} {name}"),
        Event::Output { id, elapsed, line } => format!("#{id} {:.3} {line}", elapsed.as_secs_f64()),
        Event::Done { id, elapsed } => format!("#{id} DONE {:.1}s", elapsed.as_secs_f64()),
        Event::Failed {
            id,
            elapsed,
            message,
        } => {
            let first = message.lines().next().unwrap_or_default();
            format!("#{id} ERROR after {:.1}s: {first}", elapsed.as_secs_f64())
        }
        Event::Cached { id } => format!("#{id} CACHED"),
        Event::CacheMiss { id, reason } => format!("#{id} CACHE MISS: {reason}"),
        Event::Estimate { .. } | Event::Transfer { .. } => String::new(),
        Event::Info(text) => text.clone(),
    }
}

/// Blob bytes a pull or push vertex moved.
#[derive(Clone, Copy, Default)]
struct Moved {
    received: u64,
    sent: u64,
}

impl Moved {
    /// `↓12.3 MiB ↑4.0 MiB`, for the status block.
    fn short(&self) -> String {
        let mut parts = Vec::new();
        if self.received > 0 {
            parts.push(format!("↓{}", human_bytes(self.received)));
        }
        if self.sent > 0 {
            parts.push(format!("↑{}", human_bytes(self.sent)));
        }
        parts.join(" ")
    }

    /// `12.3 MiB received, 4.0 MiB sent`, for a DONE line.
    fn long(&self) -> String {
        let mut parts = Vec::new();
        if self.received > 0 {
            parts.push(format!("{} received", human_bytes(self.received)));
        }
        if self.sent > 0 {
            parts.push(format!("{} sent", human_bytes(self.sent)));
        }
        parts.join(", ")
    }
}

/// `512 B`, `12.0 KiB`, `3.4 MiB`, `1.20 GiB`.
fn human_bytes(n: u64) -> String {
    const K: f64 = 1024.0;
    let f = n as f64;
    if f < K {
        format!("{n} B")
    } else if f < K * K {
        format!("{:.1} KiB", f / K)
    } else if f < K * K * K {
        format!("{:.1} MiB", f / (K * K))
    } else {
        format!("{:.2} GiB", f / (K * K * K))
    }
}

struct Plain {
    /// The vertex that printed last, to separate vertices with a blank line as BuildKit does.
    last: Mutex<Option<usize>>,
    /// Bytes moved by pull and push vertices, shown when they end.
    transfers: Mutex<std::collections::HashMap<usize, Moved>>,
}

impl Plain {
    fn record(&self, id: usize, received: u64, sent: u64) {
        self.transfers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Moved { received, sent });
    }

    fn transfers(&self) -> std::collections::HashMap<usize, Moved> {
        self.transfers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The event's plain line; a vertex that moved bytes says how many when it is done.
    fn text(&self, event: &Event) -> String {
        let base = plain_text(event);
        match event {
            Event::Done { id, .. } => match self.transfers().get(id) {
                Some(moved) => format!("{base} ({})", moved.long()),
                None => base,
            },
            _ => base,
        }
    }

    fn print(&self, id: Option<usize>, text: &str) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let mut err = std::io::stderr().lock();
        if id != *last && last.is_some() {
            let _ = writeln!(err);
        }
        *last = id;
        let _ = writeln!(err, "{text}");
    }
}

impl Progress for Plain {
    fn event(&self, event: Event) {
        match event {
            Event::Estimate { .. } => {}
            Event::Transfer { id, received, sent } => self.record(id, received, sent),
            event => self.print(event_id(&event), &self.text(&event)),
        }
    }
}

impl Display for Plain {
    fn summary(&self, result: &BuildResult, elapsed: Duration) {
        let id = result
            .config_digest
            .map(|c| format!(" (config {c})"))
            .unwrap_or_default();
        let s = result.stats;
        self.print(None, &format!("built {}{id}", result.image.digest));
        self.print(
            None,
            &format!(
                "{} in {:.1}s: {} steps run, {} cached, {:.1} MiB",
                if result.config_digest.is_some() {
                    "image"
                } else {
                    "index"
                },
                elapsed.as_secs_f64(),
                s.run,
                s.cached,
                result.size as f64 / 1048576.0
            ),
        );
        for p in &result.pushed {
            self.print(None, &format!("pushed {p}"));
        }
    }
}

/// `--quiet`: prints nothing while the build runs (a failure's error carries the step's last
/// output lines), then the image ID on stdout, as `docker build -q` does.
struct Quiet;

impl Progress for Quiet {
    fn event(&self, _event: Event) {}
}

impl Display for Quiet {
    fn summary(&self, result: &BuildResult, _elapsed: Duration) {
        let _ = writeln!(
            std::io::stdout().lock(),
            "{}",
            crate::args::image_id(result)
        );
    }
}

struct Json;

impl Json {
    fn emit(&self, value: serde_json::Value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{value}");
    }

    /// The last event of a failed command.
    fn error(&self, message: &str, exit_code: u8) {
        self.emit(serde_json::json!({"event": "error", "message": message, "exit_code": exit_code}))
    }
}

impl Progress for Json {
    fn event(&self, event: Event) {
        use serde_json::json;
        self.emit(match event {
            Event::Started { id, name } => json!({"event": "started", "id": id, "name": name}),
            Event::Output { id, elapsed, line } => json!({"event": "output", "id": id, "elapsed": elapsed.as_secs_f64(), "line": line}),
            Event::Done { id, elapsed } => json!({"event": "done", "id": id, "elapsed": elapsed.as_secs_f64()}),
            Event::Failed { id, elapsed, message } => json!({"event": "failed", "id": id, "elapsed": elapsed.as_secs_f64(), "message": message}),
            Event::Cached { id } => json!({"event": "cached", "id": id}),
            Event::CacheMiss { id, reason } => json!({"event": "cache_miss", "id": id, "reason": reason}),
            Event::Estimate { steps, finished, remaining } => json!({"event": "estimate", "steps": steps, "finished": finished, "remaining": remaining.map(|r| r.as_secs_f64())}),
            Event::Info(text) => json!({"event": "info", "message": text}),
            Event::Transfer { id, received, sent } => json!({"event": "transfer", "id": id, "received": received, "sent": sent}),
        })
    }
}

impl Display for Json {
    fn summary(&self, result: &BuildResult, elapsed: Duration) {
        self.emit(serde_json::json!({
            "event": "result",
            "digest": result.image.digest.to_string(),
            "mediaType": result.image.media_type,
            "config": result.config_digest.map(|c| c.to_string()),
            "size": result.size,
            "steps_run": result.stats.run,
            "steps_cached": result.stats.cached,
            "seconds": elapsed.as_secs_f64(),
            "pushed": result.pushed,
        }))
    }
}
