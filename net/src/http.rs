//! A minimal plain-HTTP server for `/metrics` (Prometheus text) and `/healthz` (Kubernetes
//! probes). It answers `GET` requests for a fixed set of paths with `Connection: close`; it is
//! not a general web server and never serves files.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What a path answers.
pub struct Response {
    /// The `Content-Type` header.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

/// The Prometheus text exposition content type.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Routes a path to its response; `None` is a 404.
pub type Routes = Arc<dyn Fn(&str) -> Option<Response> + Send + Sync>;

/// The routes every node serves: `/metrics` (the text `metrics` writes when asked) and
/// `/healthz` (`ok` while the process serves).
pub fn metrics_and_health(metrics: impl Fn() -> String + Send + Sync + 'static) -> Routes {
    Arc::new(move |path| match path {
        "/metrics" => Some(Response {
            content_type: PROMETHEUS_TEXT,
            body: metrics(),
        }),
        "/healthz" => Some(Response {
            content_type: "text/plain",
            body: "ok\n".into(),
        }),
        _ => None,
    })
}

/// Serves `routes` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, routes: Routes) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let reply =
                match tokio::time::timeout(Duration::from_secs(5), request_path(&mut socket)).await
                {
                    Ok(Some(path)) => match routes(&path) {
                        Some(r) => format_response("200 OK", r.content_type, &r.body),
                        None => format_response("404 Not Found", "text/plain", "not found\n"),
                    },
                    _ => format_response("400 Bad Request", "text/plain", "bad request\n"),
                };
            let _ = socket.write_all(reply.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

/// Reads the request head (at most 8 KiB) and returns the path of a `GET`.
async fn request_path(socket: &mut tokio::net::TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 || head.len() > 8192 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = std::str::from_utf8(&head).ok()?.lines().next()?;
    let mut parts = line.split(' ');
    let (method, target) = (parts.next()?, parts.next()?);
    if method != "GET" {
        return None;
    }
    Some(target.split('?').next()?.to_string())
}

fn format_response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_known_paths_and_404s_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let routes: Routes = Arc::new(|path| {
            (path == "/healthz").then(|| Response {
                content_type: "text/plain",
                body: "ok\n".into(),
            })
        });
        let server = tokio::spawn(serve(listener, routes));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/healthz").await;
        assert!(
            ok.starts_with("HTTP/1.1 200 OK") && ok.ends_with("\r\n\r\nok\n"),
            "{ok}"
        );
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}

/// The Prometheus text format every node serves on `/metrics`: a family's `# HELP` and `# TYPE`
/// lines, then its samples. One writer, so the three nodes' output cannot drift apart.
#[derive(Debug, Default)]
pub struct PrometheusText {
    out: String,
    family: String,
}

impl PrometheusText {
    /// Starts a family; `kind` is `counter` or `gauge`.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        use std::fmt::Write as _;
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self.family = name.to_string();
        self
    }

    /// A sample of the current family, with `labels` (values escaped as the format asks).
    pub fn sample(&mut self, labels: &[(&str, &str)], value: u64) -> &mut Self {
        self.out.push_str(&self.family);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (name, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(name);
                self.out.push_str("=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(&value.to_string());
        self.out.push('\n');
        self
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: u64) -> &mut Self {
        self.family(name, kind, help).sample(&[], value)
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod prometheus_tests {
    use super::PrometheusText;

    #[test]
    fn families_samples_and_escaped_labels() {
        let mut m = PrometheusText::default();
        m.single("a_total", "counter", "As.", 3);
        m.family("b", "gauge", "Bs.")
            .sample(&[("x", "1"), ("y", "q\"\\\n")], 4)
            .sample(&[("x", "2")], 5);
        assert_eq!(
            m.finish(),
            "# HELP a_total As.\n# TYPE a_total counter\na_total 3\n\
             # HELP b Bs.\n# TYPE b gauge\nb{x=\"1\",y=\"q\\\"\\\\\\n\"} 4\nb{x=\"2\"} 5\n"
        );
    }
}
