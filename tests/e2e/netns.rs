//! Network namespaces as a Kubernetes cluster has them, for the cluster and deploy tests: a
//! bridge (in a namespace of its own), one namespace per process or pod with a veth to the
//! bridge and its own address 10.214.K.N, and an uplink to the host at 10.214.K.1 (relays to
//! the test registries; the tests' own requests). K is each net's own, so nets of tests
//! running at once do not meet. Everything is removed when the net is dropped.

use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};

pub struct Net {
    prefix: String,
    /// 10.214.K
    subnet: String,
    namespaces: Vec<String>,
}

impl Net {
    /// `None` when namespaces cannot be made here (no root or no iproute2); under CI=true
    /// that fails instead.
    pub fn new() -> Option<Net> {
        static NEXT: AtomicU8 = AtomicU8::new(0);
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(remove_leftovers);
        // A subnet some other process still routes (a run that is going on) is skipped.
        let k = loop {
            let k = NEXT.fetch_add(1, Ordering::Relaxed);
            let routed = Command::new("ip")
                .args(["route", "show", &format!("10.214.{k}.0/24")])
                .output()
                .is_ok_and(|o| !o.stdout.is_empty());
            if !routed || k == u8::MAX {
                break k;
            }
        };
        // Interface names have at most 15 bytes: "oc" + pid (at most 7 digits) + k + "u".
        let prefix = format!("oc{}k{k}", std::process::id());
        let mut net = Net {
            prefix: prefix.clone(),
            subnet: format!("10.214.{k}"),
            namespaces: Vec::new(),
        };
        let switch = net.switch();
        let made = Command::new("ip")
            .args(["netns", "add", &switch])
            .output()
            .is_ok_and(|o| o.status.success());
        if !made {
            let msg =
                "network namespaces cannot be made here (ip netns add needs root and iproute2)";
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{msg}");
            }
            return None;
        }
        net.namespaces.push(switch.clone());
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        let host_end = format!("{prefix}u");
        ip(&[
            "link", "add", &host_end, "type", "veth", "peer", "name", "up0", "netns", &switch,
        ]);
        ip(&["-n", &switch, "link", "set", "up0", "master", "br0", "up"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.host()),
            "dev",
            &host_end,
        ]);
        ip(&["link", "set", &host_end, "up"]);
        Some(net)
    }

    fn switch(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    /// The host's address on the net.
    pub fn host(&self) -> String {
        self.addr(1)
    }

    /// The address of node `n`.
    pub fn addr(&self, n: u8) -> String {
        format!("{}.{n}", self.subnet)
    }

    /// The namespace of node `n`, made the first time it is asked for; returns its name.
    pub fn node(&mut self, n: u8) -> String {
        let ns = format!("{}-n{n}", self.prefix);
        if self.namespaces.contains(&ns) {
            return ns;
        }
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        let switch = self.switch();
        let port = format!("v{n}");
        ip(&[
            "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ]);
        ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"]);
        let addr = format!("{}/24", self.addr(n));
        ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// Takes node `n`'s link to the bridge down (`up == false`) or up again.
    pub fn link(&self, n: u8, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.switch(), "link", "set", &format!("v{n}"), state]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting the switch's namespace (the first) removes the bridge, its veths and the
        // uplink.
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Removes the namespaces of test runs that were killed before they could (named
/// `oc<pid>k<k>-...` after a process that no longer exists).
fn remove_leftovers() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("oc")
            .and_then(|rest| rest.split_once('k'))
            .map(|(pid, _)| pid)
            .filter(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if !std::path::Path::new("/proc").join(pid).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Forwards TCP connections from `listen` (on a net) to `to` (a server on the host's
/// loopback); returns the address it listens on.
pub fn relay(listen: &str, to: String) -> String {
    let listener = std::net::TcpListener::bind(listen).expect("relay: bind");
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let Ok(upstream) = TcpStream::connect(&to) else {
                continue;
            };
            for (mut from, mut into) in [
                (conn.try_clone().unwrap(), upstream.try_clone().unwrap()),
                (upstream, conn),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    addr
}
