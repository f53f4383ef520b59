//! Whether this machine can run RUN steps of another architecture: through a QEMU user-mode
//! emulator registered with binfmt_misc. The emulator must be registered with the `F` (fix
//! binary) flag: the kernel then opens it at registration time, so it still runs after the
//! sandbox has pivoted into a rootfs that does not contain it.
//!
//! The engine calls [`check`] for each target platform before the build starts, so that a
//! build that cannot run fails at once with the fix, not at its first RUN.
//!
//! A container usually has no binfmt_misc mounted even where the node has the handlers (a pod
//! on a node with the binfmt DaemonSet): there the check runs a tiny program of the
//! architecture (an ELF of three instructions that exits 0) and trusts what the kernel does.

use std::fs;
use std::path::{Path, PathBuf};

use ossb_protocol::Platform;

/// Where binfmt_misc is mounted.
const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";

/// Why steps of a platform cannot run here.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EmulationError {
    /// No enabled binfmt_misc handler for the architecture.
    #[error("cannot run {platform} steps on this {host} machine: no QEMU emulator (qemu-{qemu}) is registered with binfmt_misc{detail}\n  hint: register qemu-user-static for {platform} (e.g. apply the binfmt DaemonSet in deploy/, or on a plain host `apt-get install qemu-user-static binfmt-support`, or `docker run --privileged --rm tonistiigi/binfmt --install {arch}`), or build {platform} on a native {arch} worker pool")]
    NotRegistered {
        /// The platform asked for.
        platform: String,
        /// This machine's platform.
        host: String,
        /// The QEMU name of the architecture (`aarch64`).
        qemu: String,
        /// The GOARCH name (`arm64`).
        arch: String,
        /// What was found instead, if anything (": binfmt_misc is not mounted", ...).
        detail: String,
    },
    /// A handler exists but without the F flag, so it cannot run inside the sandbox's rootfs.
    #[error("cannot run {platform} steps: the binfmt_misc handler {name} for it is registered without the F (fix binary) flag, so its interpreter {interpreter} cannot be found inside the build's rootfs\n  hint: register it again with the F flag (qemu-user-static's binfmt-support files and tonistiigi/binfmt do), or build {platform} on a native worker pool")]
    NoFixBinary {
        /// The platform asked for.
        platform: String,
        /// The handler's name in binfmt_misc.
        name: String,
        /// Its interpreter.
        interpreter: String,
    },
    /// An architecture this check does not know.
    #[error("cannot run {0} steps: unknown architecture (known: amd64, 386, arm64, arm, ppc64le, s390x, riscv64)")]
    UnknownArchitecture(String),
}

/// The ELF identity of an architecture: QEMU's name, `e_machine`, 64-bit or not, big endian.
fn elf_of(arch: &str) -> Option<(&'static str, u16, bool, bool)> {
    Some(match arch {
        "amd64" => ("x86_64", 62, true, false),
        "386" => ("i386", 3, false, false),
        "arm64" => ("aarch64", 183, true, false),
        "arm" => ("arm", 40, false, false),
        "ppc64le" => ("ppc64le", 21, true, false),
        "s390x" => ("s390x", 22, true, true),
        "riscv64" => ("riscv64", 243, true, false),
        _ => return None,
    })
}

/// Whether a host of `host_arch` runs `arch` binaries natively.
fn native(host_arch: &str, arch: &str) -> bool {
    host_arch == arch || (host_arch == "amd64" && arch == "386")
}

/// Checks that RUN steps of `platform` can run here: natively, or through a binfmt_misc
/// emulator with the F flag.
pub fn check(platform: &Platform) -> Result<(), EmulationError> {
    check_in(Path::new(BINFMT_DIR), &Platform::host(), platform)
}

fn check_in(binfmt: &Path, host: &Platform, platform: &Platform) -> Result<(), EmulationError> {
    if native(&host.architecture, &platform.architecture) {
        return Ok(());
    }
    let (qemu, machine, is64, big) = elf_of(&platform.architecture)
        .ok_or_else(|| EmulationError::UnknownArchitecture(platform.to_string()))?;
    let not_registered = |detail: &str| EmulationError::NotRegistered {
        platform: platform.to_string(),
        host: host.to_string(),
        qemu: qemu.into(),
        arch: platform.architecture.clone(),
        detail: detail.into(),
    };
    let Ok(status) = fs::read_to_string(binfmt.join("status")) else {
        return match probe(&platform.architecture) {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(not_registered(&format!(
                " ({} is not mounted here, and a test program for {} did not run: {e})",
                binfmt.display(),
                platform.architecture
            ))),
            None => Err(not_registered(&format!(
                " ({} is not mounted: mount -t binfmt_misc binfmt_misc {})",
                binfmt.display(),
                binfmt.display()
            ))),
        };
    };
    if status.trim() != "enabled" {
        return Err(not_registered(" (binfmt_misc is disabled)"));
    }
    let mut without_f = None;
    let mut entries: Vec<PathBuf> = fs::read_dir(binfmt)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    entries.sort();
    for path in entries {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name == "status" || name == "register" {
            continue;
        }
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let Some(h) = Handler::parse(&text) else {
            continue;
        };
        if !h.enabled || !h.matches(machine, is64, big) {
            continue;
        }
        if h.flags.contains('F') {
            return Ok(());
        }
        without_f = Some(EmulationError::NoFixBinary {
            platform: platform.to_string(),
            name,
            interpreter: h.interpreter,
        });
    }
    Err(without_f.unwrap_or_else(|| not_registered("")))
}

/// Runs a program of `arch` that only exits 0, from memory; None when there is none for `arch`.
fn probe(arch: &str) -> Option<Result<(), String>> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let elf = tiny_elf(arch)?;
    // Not close-on-exec: without binfmt_misc's O flag the emulator opens /proc/self/fd/N itself.
    let fd = match nix::sys::memfd::memfd_create(
        "ossb-arch-probe",
        nix::sys::memfd::MFdFlags::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) => return Some(Err(format!("memfd_create: {e}"))),
    };
    let mut file = std::fs::File::from(fd);
    if let Err(e) = file.write_all(&elf) {
        return Some(Err(format!("writing the test program: {e}")));
    }
    let status = std::process::Command::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    Some(match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("it exited with {s}")),
        Err(e) => Err(e.to_string()),
    })
}

/// A static ELF executable for `arch` whose whole code is `exit(0)`: one PT_LOAD segment
/// mapping the file, the entry right after the headers.
fn tiny_elf(arch: &str) -> Option<Vec<u8>> {
    let (machine, is64, code): (u16, bool, &[u8]) = match arch {
        // xor edi,edi; mov eax,60; syscall
        "amd64" => (62, true, &[0x31, 0xff, 0xb8, 60, 0, 0, 0, 0x0f, 0x05]),
        // mov x0,#0; mov x8,#93; svc #0
        "arm64" => (
            183,
            true,
            &[
                0x00, 0x00, 0x80, 0xd2, 0xa8, 0x0b, 0x80, 0xd2, 0x01, 0x00, 0x00, 0xd4,
            ],
        ),
        // mov r0,#0; mov r7,#1; svc #0
        "arm" => (
            40,
            false,
            &[
                0x00, 0x00, 0xa0, 0xe3, 0x01, 0x70, 0xa0, 0xe3, 0x00, 0x00, 0x00, 0xef,
            ],
        ),
        // li a0,0; li a7,93; ecall
        "riscv64" => (
            243,
            true,
            &[
                0x13, 0x05, 0x00, 0x00, 0x93, 0x08, 0xd0, 0x05, 0x73, 0x00, 0x00, 0x00,
            ],
        ),
        _ => return None,
    };
    let (ehsize, phsize) = if is64 { (64u64, 56u64) } else { (52, 32) };
    let base: u64 = 0x10000;
    let entry = base + ehsize + phsize;
    let size = ehsize + phsize + code.len() as u64;
    let mut elf = Vec::with_capacity(size as usize);
    // Little-endian words of the class's width.
    let word = |v: u64, out: &mut Vec<u8>| {
        if is64 {
            out.extend_from_slice(&v.to_le_bytes())
        } else {
            out.extend_from_slice(&(v as u32).to_le_bytes())
        }
    };
    elf.extend_from_slice(b"\x7fELF");
    elf.extend_from_slice(&[if is64 { 2 } else { 1 }, 1, 1, 0]);
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&machine.to_le_bytes());
    elf.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    word(entry, &mut elf);
    word(ehsize, &mut elf); // program headers right after this one
    word(0, &mut elf); // no section headers
                       // ARM EABI version 5 flags; none elsewhere.
    elf.extend_from_slice(&(if machine == 40 { 0x0500_0000u32 } else { 0 }).to_le_bytes());
    for v in [ehsize as u16, phsize as u16, 1, 0, 0, 0] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    // PT_LOAD, read + execute, the whole file at `base`.
    elf.extend_from_slice(&1u32.to_le_bytes());
    if is64 {
        elf.extend_from_slice(&5u32.to_le_bytes());
    }
    word(0, &mut elf); // p_offset
    word(base, &mut elf); // p_vaddr
    word(base, &mut elf); // p_paddr
    word(size, &mut elf); // p_filesz
    word(size, &mut elf); // p_memsz
    if !is64 {
        elf.extend_from_slice(&5u32.to_le_bytes());
    }
    word(0x1000, &mut elf); // p_align
    elf.extend_from_slice(code);
    debug_assert_eq!(elf.len() as u64, size);
    Some(elf)
}

/// One binfmt_misc handler, as `/proc/sys/fs/binfmt_misc/NAME` describes it.
#[derive(Debug, Default)]
struct Handler {
    enabled: bool,
    interpreter: String,
    flags: String,
    offset: usize,
    magic: Vec<u8>,
    mask: Option<Vec<u8>>,
}

impl Handler {
    fn parse(text: &str) -> Option<Handler> {
        let mut h = Handler::default();
        for line in text.lines() {
            if line == "enabled" {
                h.enabled = true;
            } else if let Some(v) = line.strip_prefix("interpreter ") {
                h.interpreter = v.to_string();
            } else if let Some(v) = line.strip_prefix("flags:") {
                h.flags = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("offset ") {
                h.offset = v.trim().parse().ok()?;
            } else if let Some(v) = line.strip_prefix("magic ") {
                h.magic = hex(v.trim())?;
            } else if let Some(v) = line.strip_prefix("mask ") {
                h.mask = Some(hex(v.trim())?);
            }
        }
        (!h.magic.is_empty()).then_some(h)
    }

    /// Whether the handler would run an ELF executable of this machine, class and byte order:
    /// its magic, under its mask, equals the start of such an ELF header.
    fn matches(&self, machine: u16, is64: bool, big: bool) -> bool {
        let mut header = [0u8; 20];
        header[..4].copy_from_slice(b"\x7fELF");
        header[4] = if is64 { 2 } else { 1 };
        header[5] = if big { 2 } else { 1 };
        header[6] = 1;
        let (e_type, e_machine) = if big {
            (2u16.to_be_bytes(), machine.to_be_bytes())
        } else {
            (2u16.to_le_bytes(), machine.to_le_bytes())
        };
        header[16..18].copy_from_slice(&e_type);
        header[18..20].copy_from_slice(&e_machine);
        if self.offset != 0 || self.magic.len() < 20 {
            return false;
        }
        self.magic.iter().enumerate().all(|(i, m)| {
            let mask = self
                .mask
                .as_ref()
                .and_then(|k| k.get(i).copied())
                .unwrap_or(0xff);
            // Bytes past the ELF header fields we model must be masked out.
            let have = header.get(i).copied().unwrap_or(0);
            (have & mask) == (m & mask)
        })
    }
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // What Debian's qemu-user-static registers for aarch64.
    const AARCH64: &str = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\noffset 0\nmagic 7f454c460201010000000000000000000200b700\nmask ffffffffffffff00fffffffffffffffffeffffff\n";

    fn binfmt(entries: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("status"), "enabled\n").unwrap();
        fs::write(dir.path().join("register"), "").unwrap();
        for (name, text) in entries {
            fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    #[test]
    fn native_platforms_need_nothing() {
        let dir = binfmt(&[]);
        assert_eq!(
            check_in(dir.path(), &p("linux/amd64"), &p("linux/amd64")),
            Ok(())
        );
        assert_eq!(
            check_in(dir.path(), &p("linux/amd64"), &p("linux/386")),
            Ok(())
        );
    }

    #[test]
    fn a_registered_handler_with_f_is_enough() {
        let dir = binfmt(&[("qemu-aarch64", AARCH64)]);
        assert_eq!(
            check_in(dir.path(), &p("linux/amd64"), &p("linux/arm64")),
            Ok(())
        );
        // It does not pretend to run other architectures.
        let e = check_in(dir.path(), &p("linux/amd64"), &p("linux/s390x")).unwrap_err();
        assert!(e.to_string().contains("qemu-s390x"), "{e}");
    }

    #[test]
    fn missing_or_unfixed_handlers_name_the_emulator_and_both_fixes() {
        let dir = binfmt(&[]);
        let e = check_in(dir.path(), &p("linux/amd64"), &p("linux/arm64")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("qemu-aarch64"), "{msg}");
        assert!(msg.contains("DaemonSet"), "{msg}");
        assert!(msg.contains("native arm64 worker pool"), "{msg}");

        let dir = binfmt(&[("qemu-aarch64", &AARCH64.replace("flags: PF", "flags: P"))]);
        let e = check_in(dir.path(), &p("linux/amd64"), &p("linux/arm64")).unwrap_err();
        assert!(matches!(e, EmulationError::NoFixBinary { .. }), "{e}");

        let dir = binfmt(&[("qemu-aarch64", &AARCH64.replace("enabled\n", "disabled\n"))]);
        assert!(check_in(dir.path(), &p("linux/amd64"), &p("linux/arm64")).is_err());
    }

    #[test]
    fn an_unmounted_binfmt_misc_is_named() {
        let e = check_in(
            Path::new("/nonexistent/binfmt"),
            &p("linux/amd64"),
            &p("linux/s390x"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("is not mounted"), "{e}");
    }

    /// The test programs run where the kernel can run them: the host's own natively, the
    /// others exactly when a handler is registered (what scripts/testenv.sh does for arm64).
    #[test]
    fn test_programs_run_natively_and_through_registered_handlers() {
        let host = Platform::host().architecture;
        assert_eq!(probe(&host), Some(Ok(())), "the {host} test program");
        // CI's test environment registers the other of amd64 and arm64 (scripts/testenv.sh):
        // there the emulated case must run too.
        let other = if host == "amd64" { "arm64" } else { "amd64" };
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            assert!(
                check(&p(&format!("linux/{other}"))).is_ok(),
                "CI=true: linux/{other} must run through a registered handler (scripts/testenv.sh registers it)"
            );
        }
        for arch in ["amd64", "arm64", "arm", "riscv64"] {
            let registered = check_in(
                Path::new(BINFMT_DIR),
                &Platform::host(),
                &p(&format!("linux/{arch}")),
            )
            .is_ok();
            if registered && Path::new(BINFMT_DIR).join("status").exists() {
                assert_eq!(
                    probe(arch),
                    Some(Ok(())),
                    "{arch} has a handler: its test program runs"
                );
            }
        }
        // Without binfmt_misc (a pod), a registered emulator is found by running the program.
        if check(&p("linux/arm64")).is_ok() {
            assert_eq!(
                check_in(
                    Path::new("/nonexistent/binfmt"),
                    &Platform::host(),
                    &p("linux/arm64")
                ),
                Ok(())
            );
        }
    }
}
