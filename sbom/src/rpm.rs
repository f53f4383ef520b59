//! RPM packages from the SQLite rpmdb (Fedora 33+, RHEL 9+, openSUSE): the `Packages` table,
//! one header blob per package. The older Berkeley DB (`Packages`) and NDB (`Packages.db`)
//! formats are reported as not read.

use std::os::fd::AsRawFd;

use rusqlite::{Connection, OpenFlags};

use crate::osrelease::OsRelease;
use crate::package::{Findings, Kind, Package, Supplier};
use crate::purl::Purl;
use crate::rootfs::Root;
use crate::rpmheader::{tag, Header};

/// Where the rpmdb is: Fedora 36+ moved it and left `var/lib/rpm` as a symlink.
pub(crate) const DIRS: [&str; 2] = ["var/lib/rpm", "usr/lib/sysimage/rpm"];
/// One package's header is tens of KiB; a larger blob is not read.
const BLOB_LIMIT: i64 = 16 << 20;

/// Scans the first rpmdb found.
pub(crate) fn scan_rpmdb(root: &Root, os: &OsRelease, findings: &mut Findings) {
    for dir in DIRS {
        let path = format!("{dir}/rpmdb.sqlite");
        match root.open_file(&path) {
            Ok(Some(file)) => return scan_sqlite(&path, &file, os, findings),
            Ok(None) => {}
            Err(e) => return findings.warn(&path, format!("cannot open: {e}")),
        }
        for old in ["Packages", "Packages.db"] {
            let path = format!("{dir}/{old}");
            if let Ok(Some(_)) = root.open_file(&path) {
                let format = if old == "Packages" {
                    "Berkeley DB"
                } else {
                    "NDB"
                };
                return findings.warn(
                    &path,
                    format!("{format} rpmdb: format not read, RPM packages not listed"),
                );
            }
        }
    }
}

fn scan_sqlite(rel: &str, file: &std::fs::File, os: &OsRelease, findings: &mut Findings) {
    if let Err(e) = read_sqlite(rel, file, os, findings) {
        findings.warn(rel, format!("rpmdb: {e}"));
    }
}

fn read_sqlite(
    rel: &str,
    file: &std::fs::File,
    os: &OsRelease,
    findings: &mut Findings,
) -> rusqlite::Result<()> {
    // SQLite opens by path; the descriptor we opened inside the root is reached through
    // /proc so a symlink cannot redirect it. `immutable=1`: no locks, no journal or WAL files
    // looked for or created beside it (they would be paths again), nothing written.
    let uri = format!("file:/proc/self/fd/{}?immutable=1", file.as_raw_fd());
    let conn = Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let mut stmt = conn.prepare(
        "SELECT hnum, CASE WHEN length(blob) <= ?1 THEN blob END FROM Packages ORDER BY hnum",
    )?;
    let mut rows = stmt.query([BLOB_LIMIT])?;
    while let Some(row) = rows.next()? {
        let hnum: i64 = row.get(0)?;
        let Some(blob) = row.get::<_, Option<Vec<u8>>>(1)? else {
            findings.warn(
                rel,
                format!("header {hnum}: larger than {BLOB_LIMIT} bytes, skipped"),
            );
            continue;
        };
        match Header::parse(&blob) {
            Ok(header) => add_package(rel, &header, os, findings),
            Err(e) => findings.warn(rel, format!("header {hnum}: {e}")),
        }
    }
    Ok(())
}

fn add_package(rel: &str, header: &Header, os: &OsRelease, findings: &mut Findings) {
    let Some(name) = header.string(tag::NAME) else {
        return findings.warn(rel, "header without a NAME tag");
    };
    // Imported signing keys are rpmdb entries too, not software.
    if name == "gpg-pubkey" {
        return;
    }
    let version = header.string(tag::VERSION).unwrap_or_default();
    let release = header.string(tag::RELEASE).unwrap_or_default();
    let epoch = header.int32(tag::EPOCH);
    let evr = if release.is_empty() {
        version.clone()
    } else {
        format!("{version}-{release}")
    };
    let source = header.string(tag::SOURCERPM);
    let purl = Purl {
        ty: "rpm",
        namespace: Some(os.id.as_deref().unwrap_or("redhat")),
        name: &name,
        version: Some(&evr),
        qualifiers: vec![
            ("arch", header.string(tag::ARCH).unwrap_or_default()),
            ("distro", os.distro().unwrap_or_default()),
            ("epoch", epoch.map(|e| e.to_string()).unwrap_or_default()),
            ("upstream", source.clone().unwrap_or_default()),
        ],
    }
    .encode();
    let supplier = header
        .string(tag::VENDOR)
        .or_else(|| header.string(tag::PACKAGER))
        .and_then(|s| Supplier::organization(&s));
    findings.packages.push(Package {
        kind: Kind::Rpm,
        version: match epoch {
            Some(e) => format!("{e}:{evr}"),
            None => evr,
        },
        purl: Some(purl),
        license: header.string(tag::LICENSE),
        supplier,
        source,
        found_at: vec![rel.to_string()],
        name,
    });
}
