//! Network namespaces as a Kubernetes cluster has them, for the cluster and deploy tests: a
//! bridge (in a namespace of its own), one namespace per process or pod with a veth to the
//! bridge and its own address 10.214.K.N, and an uplink to the host at 10.214.K.1 (relays to
//! the test registries; the tests' own requests). K is each net's own, so nets of tests
//! running at once do not meet. Everything is removed when the net is dropped.
//!
//! The benchmarks share this file (benches/src/lib.rs includes it) to run a cluster on a
//! datacenter-shaped network: [`Net::shape_uplink`] limits the uplink's rate with `tbf`, and
//! [`relay_delayed`] adds the round trip (this kernel has no `netem`).

// Each of the two users uses part of it.
#![allow(dead_code)]

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

    /// Limits the uplink (everything between the host, where the relays to the registries run,
    /// and the net) to `rate` (`tc` syntax, e.g. `1gbit`) each way with a token bucket, as the
    /// link to a hosted registry is; the links between nodes stay unshaped.
    pub fn shape_uplink(&self, rate: &str) {
        // A burst of 2 ms at a gigabit: enough for a GSO batch, small enough to keep the rate.
        let tbf = [
            "root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms",
        ];
        let host_end = format!("{}u", self.prefix);
        for (ns, dev) in [(None, host_end.as_str()), (Some(self.switch()), "up0")] {
            let tc = |args: &[&str]| {
                let mut cmd = match &ns {
                    Some(ns) => {
                        let mut c = Command::new("ip");
                        c.args(["netns", "exec", ns, "tc"]);
                        c
                    }
                    None => Command::new("tc"),
                };
                cmd.args(args).output().expect("tc (iproute2)")
            };
            // A previous shape goes first (`tc qdisc replace` refuses to change a tbf's rate).
            let _ = tc(&["qdisc", "del", "dev", dev, "root"]);
            let out = tc(&[&["qdisc", "add", "dev", dev][..], &tbf[..]].concat());
            assert!(
                out.status.success(),
                "tc qdisc add dev {dev} tbf: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Sets the MTU of node `n`'s link to the bridge, both ends (jumbo frames, as some cloud
    /// networks have between their machines).
    pub fn set_mtu(&mut self, n: u8, mtu: u16) {
        let (ns, mtu) = (self.node(n), mtu.to_string());
        ip(&[
            "-n",
            &self.switch(),
            "link",
            "set",
            &format!("v{n}"),
            "mtu",
            &mtu,
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "mtu", &mtu]);
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
    relay_delayed(listen, to, std::time::Duration::ZERO)
}

/// As [`relay`], holding every byte back for `one_way` in each direction: a round trip of
/// twice that is added to every request, as on the way to a hosted registry. The bytes in
/// flight each way are bounded (a few MiB, the window of a real path at a gigabit), so a
/// slow reader still holds the sender back.
pub fn relay_delayed(listen: &str, to: String, one_way: std::time::Duration) -> String {
    let listener = std::net::TcpListener::bind(listen).expect("relay: bind");
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let Ok(upstream) = TcpStream::connect(&to) else {
                continue;
            };
            let _ = (conn.set_nodelay(true), upstream.set_nodelay(true));
            for (from, into) in [
                (conn.try_clone().unwrap(), upstream.try_clone().unwrap()),
                (upstream, conn),
            ] {
                std::thread::spawn(move || forward(from, into, one_way));
            }
        }
    });
    addr
}

/// Copies `from` into `into` until `from` ends, each chunk `delay` after it was read.
fn forward(mut from: TcpStream, mut into: TcpStream, delay: std::time::Duration) {
    use std::io::{Read, Write};
    if delay.is_zero() {
        let _ = std::io::copy(&mut from, &mut into);
        let _ = into.shutdown(std::net::Shutdown::Write);
        return;
    }
    // 64 chunks of at most 64 KiB in flight.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(std::time::Instant, Vec<u8>)>(64);
    let writer = std::thread::spawn(move || {
        for (read_at, chunk) in rx {
            let due = read_at + delay;
            let now = std::time::Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if into.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = into.shutdown(std::net::Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0
            || tx
                .send((std::time::Instant::now(), buf[..n].to_vec()))
                .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
}

/// Moves the calling thread into network namespace `ns` (made by [`Net::node`]): sockets it
/// opens from then on are the namespace's. Other threads stay where they are.
pub fn enter(ns: &str) {
    let path = format!("/var/run/netns/{ns}");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a namespace file this thread holds open.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}
