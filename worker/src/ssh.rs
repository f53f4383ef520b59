//! `RUN --mount=type=ssh`: a socket of the mount's owner and mode that forwards each connection
//! to an SSH agent socket of the host (`--ssh`). As BuildKit's forwarded agent, the step never
//! sees the host's socket, its path or its permissions, and nothing of it stays after the step.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A forwarding socket, served by a thread until dropped.
#[derive(Debug)]
pub struct AgentForward {
    /// Holds the socket; removed when dropped.
    dir: tempfile::TempDir,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AgentForward {
    /// Listens on a new socket owned by `uid:gid` with `mode`, forwarding to `agent`, which
    /// must accept a connection now (a dead agent is an error before the step, not in it).
    pub fn start(agent: &Path, uid: u32, gid: u32, mode: u32) -> io::Result<AgentForward> {
        drop(UnixStream::connect(agent)?);
        // In the temporary directory: a socket path must fit in 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("ossb-ssh-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()?;
        let socket = dir.path().join("agent");
        let listener = UnixListener::bind(&socket)?;
        std::os::unix::fs::chown(&socket, Some(uid), Some(gid))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(mode & 0o7777))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("ssh-agent-forward".into())
            .spawn({
                let (stop, agent) = (stop.clone(), agent.to_path_buf());
                move || serve(&listener, &agent, &stop)
            })?;
        Ok(AgentForward {
            dir,
            socket,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket to bind into the step.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for AgentForward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept; the thread sees `stop` and returns.
        drop(UnixStream::connect(&self.socket));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        tracing::trace!(dir = %self.dir.path().display(), "ssh agent forward stopped");
    }
}

fn serve(listener: &UnixListener, agent: &Path, stop: &AtomicBool) {
    for client in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection to the forwarded SSH agent");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let agent = agent.to_path_buf();
        // One thread pair per connection: agent requests are small and few.
        let _ = std::thread::Builder::new()
            .name("ssh-agent-conn".into())
            .spawn(move || match UnixStream::connect(&agent) {
                Ok(upstream) => pipe(client, upstream),
                Err(e) => tracing::warn!(agent = %agent.display(), error = %e, "the SSH agent refused a forwarded connection"),
            });
    }
}

/// Copies both ways until each side has closed its end.
fn pipe(client: UnixStream, upstream: UnixStream) {
    let (Ok(mut client_in), Ok(mut upstream_in)) = (client.try_clone(), upstream.try_clone())
    else {
        return;
    };
    let (mut client_out, mut upstream_out) = (client, upstream);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut client_in, &mut upstream_out);
        let _ = upstream_out.shutdown(std::net::Shutdown::Write);
    });
    let _ = io::copy(&mut upstream_in, &mut client_out);
    let _ = client_out.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;

    /// A stand-in agent that answers each connection with what it read, reversed.
    fn echo_agent(dir: &Path) -> PathBuf {
        let path = dir.join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let mut conn = conn.unwrap();
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    conn.read_to_end(&mut buf).unwrap();
                    buf.reverse();
                    conn.write_all(&buf).unwrap();
                });
            }
        });
        path
    }

    #[test]
    fn forwards_each_connection_with_the_owner_and_mode_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let agent = echo_agent(dir.path());
        // Ids that are not the test's own, so that a chown that does nothing fails; without
        // root only the test's own may be given (and under CI this must run as root).
        let me = std::fs::metadata(dir.path()).unwrap();
        let (uid, gid) = if me.uid() == 0 {
            (4242, 4343)
        } else {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "CI=true: this test runs as root"
            );
            (me.uid(), me.gid())
        };
        let forward = AgentForward::start(&agent, uid, gid, 0o640).unwrap();
        let meta = std::fs::symlink_metadata(forward.socket()).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o640);
        assert_eq!((meta.uid(), meta.gid()), (uid, gid));
        let ask = |text: &str| {
            let mut c = UnixStream::connect(forward.socket()).unwrap();
            c.write_all(text.as_bytes()).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let mut answer = String::new();
            c.read_to_string(&mut answer).unwrap();
            answer
        };
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| ask("first"));
            let b = s.spawn(|| ask("second"));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!((a.as_str(), b.as_str()), ("tsrif", "dnoces"));
        let socket = forward.socket().to_path_buf();
        drop(forward);
        assert!(!socket.exists(), "the forwarding socket outlived the step");
    }

    #[test]
    fn a_dead_agent_is_an_error_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("no-agent.sock");
        let err = AgentForward::start(&gone, 0, 0, 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
