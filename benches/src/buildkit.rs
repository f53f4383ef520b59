//! BuildKit as a peer: Debian's `docker.io` (dockerd 20.10 with its built-in BuildKit), started
//! by the bench itself on private directories so that it changes nothing on the host: its own
//! `--data-root`, `--exec-root`, pid file and unix socket, no bridge, no iptables rules, no
//! IP forwarding (`../shared/ENVIRONMENT.md`, "BuildKit as a peer"). Builds run with
//! `DOCKER_BUILDKIT=1 /usr/bin/docker build --network host` (the 20.10 client: the other
//! `docker` on the PATH is newer and may not speak to this daemon), the base image from the
//! local registry. Dropping the [`Dockerd`] stops it by its pid file and unmounts whatever is
//! left under its directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DOCKERD: &str = "/usr/sbin/dockerd";
const DOCKER: &str = "/usr/bin/docker";

/// Whether the BuildKit peer runs (`OSSB_BENCH_BUILDKIT=0` leaves it out).
pub fn enabled() -> bool {
    std::env::var("OSSB_BENCH_BUILDKIT").map_or(true, |v| v != "0")
}

/// Installs Debian's `docker.io` when dockerd or its client is missing, as scripts/testenv.sh
/// installs its packages: without recommends, waiting for another apt's lock, and with a
/// `policy-rc.d` that stops the package's postinst from starting the system's dockerd (which
/// would set up docker0 and iptables rules on the host) unless one exists already.
pub fn ensure_installed() {
    if Path::new(DOCKERD).is_file() && Path::new(DOCKER).is_file() {
        return;
    }
    eprintln!("BuildKit peer: installing docker.io (apt-get)");
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let made_policy = !policy.exists();
    if made_policy {
        std::fs::write(
            policy,
            "#!/bin/sh\n# made by ossb benches/src/buildkit.rs during apt-get install\nexit 101\n",
        )
        .expect("writing /usr/sbin/policy-rc.d");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))
            .expect("chmod /usr/sbin/policy-rc.d");
    }
    let lock = ["-o", "DPkg::Lock::Timeout=300", "-o", "Dpkg::Use-Pty=0"];
    let update = Command::new("apt-get")
        .args(["update", "-q"])
        .args(lock)
        .output();
    let install = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(lock)
        .args(["-o", "Dpkg::Options::=--force-confold", "docker.io"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output();
    if made_policy {
        let _ = std::fs::remove_file(policy);
    }
    let install = install.expect("running apt-get install docker.io");
    assert!(
        install.status.success(),
        "apt-get install docker.io failed (update: {:?}):\n{}{}",
        update.map(|o| o.status),
        String::from_utf8_lossy(&install.stdout),
        String::from_utf8_lossy(&install.stderr)
    );
    assert!(
        Path::new(DOCKERD).is_file() && Path::new(DOCKER).is_file(),
        "docker.io installed but {DOCKERD} or {DOCKER} is missing"
    );
}

/// A dockerd of our own, stopped (and its mounts removed) on drop.
pub struct Dockerd {
    dir: PathBuf,
    child: Option<Child>,
}

impl Dockerd {
    /// Installs docker.io if needed and starts dockerd with everything under `dir` (made
    /// afresh), `insecure_registry` allowed over plain HTTP. Waits until it answers.
    pub fn start(dir: &Path, insecure_registry: &str) -> Dockerd {
        ensure_installed();
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("client")).unwrap();
        // An empty daemon configuration of our own: /etc/docker/daemon.json, if someone
        // writes one, must not change how the peer runs.
        std::fs::write(dir.join("daemon.json"), "{}\n").unwrap();
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let child = Command::new(DOCKERD)
            .arg("--config-file")
            .arg(dir.join("daemon.json"))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", dir.join("docker.sock").display()))
            .args([
                "--iptables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--bridge=none",
                "--storage-driver",
                "overlay2",
                "--insecure-registry",
                insecure_registry,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {DOCKERD}: {e}"));
        let mut d = Dockerd {
            dir: dir.to_path_buf(),
            child: Some(child),
        };
        let start = Instant::now();
        loop {
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                d.child = None;
                panic!("dockerd exited at start ({status}):\n{}", d.log_tail());
            }
            let ok = d
                .docker()
                .args(["version", "--format", "{{.Server.Version}}"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            if start.elapsed() > Duration::from_secs(60) {
                panic!("dockerd did not answer within 60 s:\n{}", d.log_tail());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "BuildKit peer: dockerd {} up in {:.1} s ({})",
            d.version(),
            start.elapsed().as_secs_f64(),
            dir.display()
        );
        d
    }

    /// `/usr/bin/docker` talking to this daemon, with BuildKit on and a client configuration
    /// of its own.
    pub fn docker(&self) -> Command {
        let mut cmd = Command::new(DOCKER);
        cmd.env(
            "DOCKER_HOST",
            format!("unix://{}", self.dir.join("docker.sock").display()),
        )
        .env("DOCKER_BUILDKIT", "1")
        .env("DOCKER_CONFIG", self.dir.join("client"));
        cmd
    }

    /// The daemon's version.
    pub fn version(&self) -> String {
        self.docker()
            .args(["version", "--format", "{{.Server.Version}}"])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    }

    /// `docker build --network host` of `context` tagged `tag`, for `platform` when given.
    pub fn build(&self, context: &Path, tag: &str, platform: Option<&str>) -> Command {
        let mut cmd = self.docker();
        cmd.args([
            "build",
            "--progress",
            "plain",
            "--network",
            "host",
            "-t",
            tag,
        ]);
        if let Some(p) = platform {
            cmd.args(["--platform", p]);
        }
        cmd.arg(context);
        cmd
    }

    /// One build per platform of `platforms`, all at once, each tagged `TAG-OS-ARCH`:
    /// dockerd 20.10's BuildKit refuses a multi-platform build ("amd64,linux" is an invalid
    /// component of the platform) and has no image store for an index, so this is the
    /// nearest it comes to one build of several platforms (BuildKit solves them together
    /// too). Fails when any of them fails.
    pub fn build_platforms(&self, context: &Path, tag: &str, platforms: &[&str]) -> Command {
        let mut cmd = Command::new("/bin/sh");
        for (k, v) in self.docker().get_envs() {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        cmd.args([
            "-c",
            r#"set -e; ctx=$1; tag=$2; shift 2; pids=
for p in "$@"; do
  "$DOCKER" build --progress plain --network host --platform "$p" -t "$tag-$(echo "$p" | tr / -)" "$ctx" &
  pids="$pids $!"
done
for pid in $pids; do wait "$pid"; done"#,
            "sh",
        ])
        .env("DOCKER", DOCKER)
        .arg(context)
        .arg(tag)
        .args(platforms);
        cmd
    }

    /// Back to an empty cache for a cold build: every build cache record and every image
    /// (the tagged results, and the base images the builds pulled) goes.
    pub fn reset(&self) {
        for args in [
            &["builder", "prune", "-af"][..],
            &["image", "prune", "-af"][..],
        ] {
            let out = self.docker().args(args).output().unwrap();
            assert!(
                out.status.success(),
                "docker {args:?} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = self.docker().args(["image", "ls", "-aq"]).output().unwrap();
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if !ids.is_empty() {
            let _ = self.docker().args(["rmi", "-f"]).args(&ids).output();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Stops dockerd (SIGTERM by its pid file, SIGKILL after 30 s) and the containerd it
    /// supervises, then unmounts whatever is still mounted under its directory.
    fn stop(&mut self) {
        let pid = read_pid(&self.dir.join("dockerd.pid"))
            .or_else(|| self.child.as_ref().map(|c| c.id() as libc::pid_t));
        if let Some(pid) = pid {
            // SAFETY: kill(2) with a pid read from dockerd's own pid file (or our child's).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if let Some(mut child) = self.child.take() {
            let start = Instant::now();
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if start.elapsed() > Duration::from_secs(30) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        }
        // dockerd stops its containerd when it exits cleanly; after a SIGKILL it is left.
        if let Some(pid) = read_pid(&self.dir.join("exec/containerd/containerd.pid")) {
            // SAFETY: as above; the pid file is the supervised containerd's.
            if unsafe { libc::kill(pid, 0) } == 0 {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        unmount_under(&self.dir);
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        if self.dir.exists() {
            let _ = writeln!(
                std::io::stderr(),
                "BuildKit peer: could not remove {}",
                self.dir.display()
            );
        }
    }
}

fn read_pid(path: &Path) -> Option<libc::pid_t> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Unmounts (lazily, deepest first) every mount point at or under `dir`.
fn unmount_under(dir: &Path) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for p in points {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: umount2 with a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "BuildKit peer: umount {}: {}",
                p.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}

/// mountinfo writes space, tab, newline and backslash in paths as `\NNN` (octal).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes() {
        assert_eq!(super::unescape_mountinfo(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(super::unescape_mountinfo(r"/tmp/x\134"), r"/tmp/x\");
        assert_eq!(super::unescape_mountinfo("/plain"), "/plain");
    }
}
