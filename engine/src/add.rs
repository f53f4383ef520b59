//! What ADD does beyond COPY: remote files by URL (verified with `--checksum`), git
//! repositories (`https://host/repo.git#ref:subdir`, `git@host:repo.git`), and local tar
//! archives (plain, gzip, zstd, bzip2, xz) unpacked into the destination.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ossb_image::layer::{self, ApplyOptions};
use ossb_worker::fs as wfs;

use crate::error::AddError;

/// Whether an ADD source is a URL rather than a context path.
pub(crate) fn is_url(source: &str) -> bool {
    source.starts_with("http://") || source.starts_with("https://")
}

/// Whether an ADD source names a git repository (not supported yet).
pub(crate) fn is_git(source: &str) -> bool {
    source.starts_with("git@")
        || source.starts_with("git://")
        || (is_url(source)
            && source
                .split('#')
                .next()
                .is_some_and(|u| u.ends_with(".git")))
}

/// Whether an ADD source is fetched rather than read from the context.
pub(crate) fn is_remote(source: &str) -> bool {
    is_url(source) || is_git(source)
}

/// A fetched ADD source: copy `names` from `dir`; `key` identifies the content for the cache.
pub(crate) struct Fetched {
    pub dir: PathBuf,
    pub names: Vec<String>,
    pub key: Vec<u8>,
    /// The source as a provenance material: its URL with the sha256 of what was fetched, or
    /// the git source with its commit.
    pub material: ossb_attest::Material,
}

/// Fetches a remote ADD source into `work` (once per build: a second call reuses it).
pub(crate) async fn fetch(
    source: &str,
    checksum: Option<&str>,
    keep_git_dir: bool,
    work: &Path,
) -> Result<Fetched, AddError> {
    if is_git(source) {
        let (dir, commit) = clone(source, keep_git_dir, &work.join("git")).await?;
        let mut key = format!("git:{commit}:keep={keep_git_dir}:").into_bytes();
        key.extend_from_slice(source.as_bytes());
        return Ok(Fetched {
            dir,
            names: vec![".".into()],
            key,
            material: ossb_attest::Material::git(source, &commit),
        });
    }
    let file = download(source, checksum, &work.join("downloads")).await?;
    let bytes = fs::read(&file).map_err(|source| AddError::Read {
        path: file.clone(),
        source,
    })?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Fetched {
        dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
        names: vec![name],
        key: blake3::hash(&bytes).as_bytes().to_vec(),
        material: ossb_attest::Material::sha256(source, &ossb_protocol::Digest::of(&bytes)),
    })
}

/// `URL[#REF[:SUBDIR]]` as BuildKit writes git sources.
fn split_git(source: &str) -> (&str, Option<&str>, Option<&str>) {
    let (url, fragment) = match source.split_once('#') {
        Some((u, f)) => (u, Some(f)),
        None => (source, None),
    };
    match fragment {
        Some(f) => match f.split_once(':') {
            Some((r, sub)) => (
                url,
                (!r.is_empty()).then_some(r),
                (!sub.is_empty()).then_some(sub),
            ),
            None => (url, (!f.is_empty()).then_some(f), None),
        },
        None => (url, None, None),
    }
}

/// Clones a git source with the `git` command; returns the directory to copy (the subdir when
/// given) and the commit checked out.
async fn clone(
    source: &str,
    keep_git_dir: bool,
    work: &Path,
) -> Result<(PathBuf, String), AddError> {
    let (url, reference, subdir) = split_git(source);
    let slot_name = format!("{source}\0keep-git-dir={keep_git_dir}");
    let slot = work.join(blake3::hash(slot_name.as_bytes()).to_hex().as_str());
    let repo = slot.join("repo");
    let io = |e| AddError::Io {
        url: source.to_string(),
        source: e,
    };
    if !repo.exists() {
        fs::create_dir_all(&slot).map_err(io)?;
        let tmp = tempfile::tempdir_in(&slot).map_err(io)?;
        let checkout = tmp.path().join("repo");
        let is_commit =
            reference.is_some_and(|r| r.len() >= 7 && r.chars().all(|c| c.is_ascii_hexdigit()));
        let dest = checkout.to_string_lossy().into_owned();
        let branch: Vec<&str> = match (reference, is_commit) {
            (Some(r), false) => vec!["--branch", r],
            _ => Vec::new(),
        };
        let shallow = [
            &["clone", "--quiet", "--depth", "1"][..],
            &branch,
            &["--", url, &dest],
        ]
        .concat();
        if is_commit || git(&shallow, None, source).await.is_err() {
            // Dumb HTTP servers and commit references need a full clone.
            let _ = fs::remove_dir_all(&checkout);
            let full = [&["clone", "--quiet"][..], &branch, &["--", url, &dest]].concat();
            git(&full, None, source).await?;
        }
        if let (Some(r), true) = (reference, is_commit) {
            git(&["checkout", "--quiet", r], Some(&checkout), source).await?;
        }
        if !keep_git_dir {
            fs::remove_dir_all(checkout.join(".git")).map_err(io)?;
        }
        fs::rename(&checkout, &repo).map_err(io)?;
    }
    let commit = fs::read_to_string(slot.join("commit")).ok();
    let commit = match commit {
        Some(c) => c,
        None => {
            // Resolved from the remote, so the key does not depend on the clone kept or not.
            let out = git_output(
                &["ls-remote", "--", url, reference.unwrap_or("HEAD")],
                source,
            )
            .await?;
            let c = out
                .split_whitespace()
                .next()
                .map(str::to_string)
                .unwrap_or_else(|| reference.unwrap_or("HEAD").to_string());
            let _ = fs::write(slot.join("commit"), &c);
            c
        }
    };
    let dir = match subdir {
        Some(sub) => ossb_worker::fs::resolve_in_root(&repo, sub, true)?,
        None => repo,
    };
    Ok((dir, commit))
}

async fn git(args: &[&str], cwd: Option<&Path>, source: &str) -> Result<(), AddError> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.args(args).env("GIT_TERMINAL_PROMPT", "0");
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let out = cmd.output().await.map_err(|e| AddError::GitSpawn {
        url: source.to_string(),
        ask_installed: true,
        source: e,
    })?;
    git_status(&out, args, source)
}

async fn git_output(args: &[&str], source: &str) -> Result<String, AddError> {
    let out = tokio::process::Command::new("git")
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .await
        .map_err(|e| AddError::GitSpawn {
            url: source.to_string(),
            ask_installed: false,
            source: e,
        })?;
    git_status(&out, args, source)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `AddError::Git` when git `args` exited unsuccessfully.
fn git_status(out: &std::process::Output, args: &[&str], source: &str) -> Result<(), AddError> {
    if out.status.success() {
        return Ok(());
    }
    Err(AddError::Git {
        url: source.to_string(),
        command: args.first().unwrap_or(&"").to_string(),
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// The file name ADD gives a download: the last segment of the URL's path.
fn url_file_name(url: &str) -> String {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let after_host = path.splitn(4, '/').nth(3).unwrap_or("");
    match after_host.rsplit('/').next() {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => "index.html".to_string(),
    }
}

/// Downloads `url` into `dir` (once per build: a second call returns the same file), checks
/// `checksum` (`sha256:<hex>`) when given. The file has mode 0600, as Docker gives downloads.
pub(crate) async fn download(
    url: &str,
    checksum: Option<&str>,
    dir: &Path,
) -> Result<PathBuf, AddError> {
    let slot = dir.join(blake3::hash(url.as_bytes()).to_hex().as_str());
    let file = slot.join(url_file_name(url));
    if file.is_file() {
        return Ok(file);
    }
    let io = |e| AddError::Io {
        url: url.to_string(),
        source: e,
    };
    let fetch = |e| AddError::Fetch {
        url: url.to_string(),
        source: e,
    };
    fs::create_dir_all(&slot).map_err(io)?;
    let response = reqwest::get(url).await.map_err(fetch)?;
    let status = response.status();
    if !status.is_success() {
        return Err(AddError::HttpStatus {
            url: url.to_string(),
            status,
        });
    }
    let bytes = response.bytes().await.map_err(fetch)?;
    if let Some(expected) = checksum {
        let actual = ossb_protocol::Digest::of(&bytes);
        if actual.to_string() != expected {
            return Err(AddError::Checksum {
                url: url.to_string(),
                expected: expected.to_string(),
                actual,
            });
        }
    }
    let mut tmp = tempfile::NamedTempFile::new_in(&slot).map_err(io)?;
    tmp.write_all(&bytes).map_err(io)?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o600)).map_err(io)?;
    tmp.persist(&file).map_err(|e| io(e.error))?;
    Ok(file)
}

/// The kind of archive a file is, by its first bytes (as Docker decides, not by its name).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Archive {
    /// tar, plain or gzip/zstd compressed (the layer reader decompresses these itself).
    Tar,
    /// A bzip2-compressed tar.
    Bzip2,
    /// An xz-compressed tar.
    Xz,
}

/// What kind of archive `path` is, if any.
pub(crate) fn archive_kind(path: &Path) -> Option<Archive> {
    // Only a regular file is read: opening a fifo would wait for a writer forever.
    if !fs::metadata(path).ok()?.is_file() {
        return None;
    }
    let mut head = [0u8; 512];
    let n = fs::File::open(path).ok()?.read(&mut head).ok()?;
    let head = &head[..n];
    if head.starts_with(&[0x1f, 0x8b]) || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        // Compressed: only an archive if a tar is inside; the layer reader checks that.
        return Some(Archive::Tar);
    }
    if n >= 262 && &head[257..262] == b"ustar" {
        return Some(Archive::Tar);
    }
    if head.starts_with(b"BZh") {
        return Some(Archive::Bzip2);
    }
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        return Some(Archive::Xz);
    }
    None
}

/// Unpacks the tar archive `archive` into the directory `dest` (absolute, in the rootfs),
/// creating it. Entries cannot leave `dest`.
pub(crate) fn extract(archive: &Path, rootfs: &Path, dest: &str) -> Result<(), AddError> {
    wfs::make_workdir(rootfs, dest, (0, 0))?;
    let target = wfs::resolve_in_root(rootfs, dest, true)?;
    let open = || {
        fs::File::open(archive).map_err(|source| AddError::Read {
            path: archive.to_path_buf(),
            source,
        })
    };
    let unpack_io = |source| AddError::UnpackIo {
        archive: archive.to_path_buf(),
        source,
    };
    // A user's archive, not a layer: `.wh.` names are files (as Docker's untar).
    let opts = ApplyOptions {
        whiteouts: false,
        ..ApplyOptions::default()
    };
    let unpacked = match archive_kind(archive) {
        Some(Archive::Bzip2) => {
            let tar = bzip2::read::MultiBzDecoder::new(std::io::BufReader::new(open()?));
            layer::apply_layer(std::io::BufReader::new(tar), &target, &opts)
        }
        Some(Archive::Xz) => {
            // lzma-rs decodes into a writer: the tar goes through a temporary file beside
            // the archive, never whole in memory.
            let mut tar = tempfile::tempfile_in(archive.parent().unwrap_or(Path::new(".")))
                .map_err(unpack_io)?;
            lzma_rs::xz_decompress(&mut std::io::BufReader::new(open()?), &mut tar).map_err(
                |source| AddError::Xz {
                    archive: archive.to_path_buf(),
                    source,
                },
            )?;
            std::io::Seek::rewind(&mut tar).map_err(unpack_io)?;
            layer::apply_layer(std::io::BufReader::new(tar), &target, &opts)
        }
        _ => layer::apply_layer(std::io::BufReader::new(open()?), &target, &opts),
    };
    unpacked
        .map(|report| {
            for line in report.warnings() {
                tracing::warn!("ADD {}: {line}", archive.display());
            }
        })
        .map_err(|source| AddError::Unpack {
            archive: archive.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_downloads_like_docker() {
        assert_eq!(
            url_file_name("https://example.com/a/b/tool.tar.gz?x=1"),
            "tool.tar.gz"
        );
        assert_eq!(url_file_name("http://example.com/"), "index.html");
        assert_eq!(url_file_name("http://example.com"), "index.html");
        assert!(is_git("https://github.com/moby/buildkit.git#v0.12"));
        assert!(is_git("git@github.com:moby/buildkit.git"));
        assert!(!is_git("https://example.com/file.tar"));
        assert_eq!(
            split_git("https://h/r.git#v1:sub/dir"),
            ("https://h/r.git", Some("v1"), Some("sub/dir"))
        );
        assert_eq!(
            split_git("https://h/r.git"),
            ("https://h/r.git", None, None)
        );
        assert_eq!(
            split_git("https://h/r.git#:sub"),
            ("https://h/r.git", None, Some("sub"))
        );
    }

    #[test]
    fn recognizes_archives_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let tar_path = dir.path().join("x.bin");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, "f.txt", &b"hi"[..]).unwrap();
        fs::write(&tar_path, b.into_inner().unwrap()).unwrap();
        assert_eq!(archive_kind(&tar_path), Some(Archive::Tar));
        fs::write(dir.path().join("t.txt"), "just text").unwrap();
        assert_eq!(archive_kind(&dir.path().join("t.txt")), None);
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        extract(&tar_path, &root, "/opt/x").unwrap();
        assert_eq!(fs::read_to_string(root.join("opt/x/f.txt")).unwrap(), "hi");
    }
}
