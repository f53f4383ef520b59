//! A small HTTP/1.1 reverse proxy for the registry tests, in front of a real registry: it
//! forwards every request (one per connection, `Connection: close`) and, when a rule
//! matches, injects a fault instead: an error status, 429 with `Retry-After`, a connection
//! that breaks off (closed, or reset with a TCP RST) in the middle of a body, or a flipped byte. With a
//! [`TokenAuthority`](crate::token_server::TokenAuthority) it also demands Bearer tokens with
//! the right scopes, as Docker Hub does, turning the plain registry into a token-auth one.
//! Every request is logged so tests can check what the client did.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::token_server::TokenAuthority;

/// What to do instead of (or while) forwarding.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Answer with this status (the request is not forwarded).
    Status(u16),
    /// 429 with `Retry-After: SECONDS` (not forwarded).
    RetryAfter(u64),
    /// Forward, relay the answer's head and half its body, then close the connection.
    BreakResponse,
    /// As `BreakResponse`, but the connection is reset (a TCP RST), as a crashing registry or
    /// a load balancer dropping it would.
    ResetResponse,
    /// Forward half of the request body, then close both connections.
    BreakRequest,
    /// Forward, and flip one byte in the middle of the answer's body.
    CorruptByte,
    /// Forward, relay the answer's head and half its body, then send nothing for this many
    /// seconds (a stalled registry or network), then close.
    Stall(u64),
}

/// When to inject a fault: the first `times` requests whose method and path match.
#[derive(Clone, Debug)]
pub struct Rule {
    /// `GET`, `PUT`, ... or `""` for any.
    pub method: &'static str,
    /// A substring of the path (with its query).
    pub path_contains: String,
    pub fault: Fault,
    /// How many matching requests to hit; `usize::MAX` for all.
    pub times: usize,
}

impl Rule {
    pub fn new(method: &'static str, path_contains: &str, fault: Fault, times: usize) -> Rule {
        Rule {
            method,
            path_contains: path_contains.to_string(),
            fault,
            times,
        }
    }
}

/// One request the proxy saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub status: u16,
    pub fault: Option<Fault>,
    pub at: Instant,
}

/// A running proxy; it stops with the test process.
pub struct Proxy {
    pub addr: String,
    rules: Arc<Mutex<Vec<Rule>>>,
    log: Arc<Mutex<Vec<Seen>>>,
}

impl Proxy {
    /// Starts a proxy on a free loopback port in front of `upstream` (`host:port`).
    pub fn start(upstream: &str, auth: Option<Arc<TokenAuthority>>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let rules = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (r, l, up) = (rules.clone(), log.clone(), upstream.to_string());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (r, l, up, auth) = (r.clone(), l.clone(), up.clone(), auth.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &up, &r, &l, auth.as_deref());
                });
            }
        });
        Proxy { addr, rules, log }
    }

    /// Adds a rule.
    pub fn inject(&self, rule: Rule) {
        self.rules.lock().unwrap().push(rule);
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.rules.lock().unwrap().clear();
    }

    /// What the proxy saw so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }

    /// Forgets what it saw.
    pub fn forget(&self) {
        self.log.lock().unwrap().clear();
    }
}

/// A parsed request or response head.
pub struct Head {
    pub first_line: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> Option<u64> {
        self.header("content-length").and_then(|v| v.parse().ok())
    }

    fn write_to(&self, out: &mut impl Write, drop: &[&str]) -> std::io::Result<()> {
        let mut text = format!("{}\r\n", self.first_line);
        for (k, v) in &self.headers {
            if !drop.iter().any(|d| k.eq_ignore_ascii_case(d)) {
                text.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        text.push_str("Connection: close\r\n\r\n");
        out.write_all(text.as_bytes())
    }
}

/// Reads a head; `None` at EOF.
pub fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut first_line = String::new();
    if r.read_line(&mut first_line)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(Some(Head {
        first_line: first_line.trim_end().to_string(),
        headers,
    }))
}

/// Reads a request body (Content-Length or chunked) whole; the tests' bodies are small
/// except blob uploads, which are streamed by [`serve`] instead.
pub fn read_body(r: &mut impl BufRead, head: &Head) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if let Some(n) = head.content_length() {
        r.take(n).read_to_end(&mut body)?;
    } else if head
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = u64::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                let mut end = String::new();
                r.read_line(&mut end)?;
                break;
            }
            r.take(n).read_to_end(&mut body)?;
            let mut crlf = String::new();
            r.read_line(&mut crlf)?;
        }
    }
    Ok(body)
}

/// Writes a complete small response.
pub fn respond(out: &mut impl Write, status: u16, headers: &[(&str, String)], body: &[u8]) {
    let mut text = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let _ = out.write_all(text.as_bytes());
    let _ = out.write_all(body);
    let _ = out.flush();
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        401 => "Unauthorized",
        403 => "Forbidden",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn serve(
    client: TcpStream,
    upstream: &str,
    rules: &Mutex<Vec<Rule>>,
    log: &Mutex<Vec<Seen>>,
    auth: Option<&TokenAuthority>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client_out = client;
    let Some(head) = read_head(&mut reader)? else {
        return Ok(());
    };
    let mut parts = head.first_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let range = head.header("range").map(str::to_string);
    let record = |status: u16, fault: Option<Fault>| {
        log.lock().unwrap().push(Seen {
            method: method.clone(),
            path: path.clone(),
            range: range.clone(),
            status,
            fault,
            at: Instant::now(),
        })
    };

    if let Some(auth) = auth {
        if let Err(challenge) = auth.check(&method, &path, head.header("authorization")) {
            let _ = read_body(&mut reader, &head);
            record(401, None);
            let body =
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
            respond(
                &mut client_out,
                401,
                &[
                    ("WWW-Authenticate", challenge),
                    ("Content-Type", "application/json".into()),
                ],
                body,
            );
            return Ok(());
        }
    }

    let fault = {
        let mut rules = rules.lock().unwrap();
        rules
            .iter_mut()
            .find(|r| {
                r.times > 0
                    && (r.method.is_empty() || r.method == method)
                    && path.contains(&r.path_contains)
            })
            .map(|r| {
                r.times = r.times.saturating_sub(1);
                r.fault.clone()
            })
    };
    match fault {
        Some(Fault::Status(code)) => {
            let _ = read_body(&mut reader, &head);
            record(code, fault.clone());
            respond(&mut client_out, code, &[], b"injected failure");
            return Ok(());
        }
        Some(Fault::RetryAfter(secs)) => {
            let _ = read_body(&mut reader, &head);
            record(429, fault.clone());
            respond(
                &mut client_out,
                429,
                &[("Retry-After", secs.to_string())],
                b"slow down",
            );
            return Ok(());
        }
        _ => {}
    }

    let mut up = TcpStream::connect(upstream)?;
    // The registry builds upload Locations from Host: keep the client's (the proxy's) Host.
    head.write_to(&mut up, &["connection", "authorization"])?;
    let request_length = head.content_length();
    if let Some(n) = request_length {
        if fault == Some(Fault::BreakRequest) {
            std::io::copy(&mut (&mut reader).take(n / 2), &mut up)?;
            record(0, fault.clone());
            let _ = up.shutdown(Shutdown::Both);
            let _ = client_out.shutdown(Shutdown::Both);
            return Ok(());
        }
        std::io::copy(&mut (&mut reader).take(n), &mut up)?;
    } else if head.header("transfer-encoding").is_some() {
        let body = read_body(&mut reader, &head)?;
        // Re-sent with a length: the upstream head said chunked, so send it chunked.
        write!(up, "{:x}\r\n", body.len())?;
        up.write_all(&body)?;
        up.write_all(b"\r\n0\r\n\r\n")?;
    }
    up.flush()?;

    let mut up_reader = BufReader::new(up);
    let Some(resp) = read_head(&mut up_reader)? else {
        return Ok(());
    };
    let status: u16 = resp
        .first_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    record(status, fault.clone());
    resp.write_to(&mut client_out, &["connection"])?;
    let body_len = if method == "HEAD" {
        Some(0)
    } else {
        resp.content_length()
    };
    match (fault, body_len) {
        (Some(Fault::BreakResponse), Some(n)) if n > 1 => {
            std::io::copy(&mut (&mut up_reader).take(n / 2), &mut client_out)?;
            client_out.flush()?;
            let _ = client_out.shutdown(Shutdown::Both);
        }
        (Some(Fault::ResetResponse), Some(n)) if n > 1 => {
            std::io::copy(&mut (&mut up_reader).take(n / 2), &mut client_out)?;
            client_out.flush()?;
            // Closing the last descriptor of the socket now sends a RST.
            reset_on_close(&client_out);
            return Ok(());
        }
        (Some(Fault::Stall(secs)), Some(n)) if n > 1 => {
            std::io::copy(&mut (&mut up_reader).take(n / 2), &mut client_out)?;
            client_out.flush()?;
            std::thread::sleep(std::time::Duration::from_secs(secs));
            let _ = client_out.shutdown(Shutdown::Both);
        }
        (Some(Fault::CorruptByte), Some(n)) if n > 0 => {
            std::io::copy(&mut (&mut up_reader).take(n / 2), &mut client_out)?;
            let mut byte = [0u8; 1];
            up_reader.read_exact(&mut byte)?;
            byte[0] ^= 0x20;
            client_out.write_all(&byte)?;
            std::io::copy(&mut up_reader, &mut client_out)?;
        }
        (_, Some(n)) => {
            std::io::copy(&mut (&mut up_reader).take(n), &mut client_out)?;
        }
        (_, None) => {
            std::io::copy(&mut up_reader, &mut client_out)?;
        }
    }
    client_out.flush()?;
    Ok(())
}

/// Makes the socket's close send a TCP RST instead of a FIN (SO_LINGER with a zero timeout).
fn reset_on_close(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the descriptor is an open socket owned by `stream`, and the option value is a
    // `linger` of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt(SO_LINGER): {}",
        std::io::Error::last_os_error()
    );
}
