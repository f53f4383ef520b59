//! Progress display: BuildKit's plain format (`#N name`, `#N 0.123 output`, `#N DONE 0.4s`) or
//! one JSON object per event.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use ossb_coordinator::{BuildResult, Event, Progress};

use crate::args::ProgressMode;

/// A progress sink that can also print the closing summary.
pub trait Display: Progress {
    /// Prints what was built.
    fn summary(&self, result: &BuildResult, elapsed: Duration);
}

/// The display for `mode`. The interactive display is not written yet: tty uses plain.
pub fn for_mode(mode: ProgressMode) -> Box<dyn Display> {
    match mode {
        ProgressMode::Json => Box::new(Json),
        ProgressMode::Auto | ProgressMode::Tty | ProgressMode::Plain => {
            let _ = std::io::stderr().is_terminal();
            Box::new(Plain {
                last: Mutex::new(None),
            })
        }
    }
}

struct Plain {
    /// The vertex that printed last, to separate vertices with a blank line as BuildKit does.
    last: Mutex<Option<usize>>,
}

impl Plain {
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
            Event::Started { id, name } => self.print(Some(id), &format!("#{id} {name}")),
            Event::Output { id, elapsed, line } => self.print(
                Some(id),
                &format!("#{id} {:.3} {line}", elapsed.as_secs_f64()),
            ),
            Event::Done { id, elapsed } => self.print(
                Some(id),
                &format!("#{id} DONE {:.1}s", elapsed.as_secs_f64()),
            ),
            Event::Failed {
                id,
                elapsed,
                message,
            } => {
                let first = message.lines().next().unwrap_or_default();
                self.print(
                    Some(id),
                    &format!("#{id} ERROR after {:.1}s: {first}", elapsed.as_secs_f64()),
                )
            }
            Event::Cached { id } => self.print(Some(id), &format!("#{id} CACHED")),
            Event::Info(text) => self.print(None, &text),
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

struct Json;

impl Json {
    fn emit(&self, value: serde_json::Value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{value}");
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
            Event::Info(text) => json!({"event": "info", "message": text}),
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
