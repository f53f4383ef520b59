//! The context's git facts, gathered as buildx gathers them (`build/git.go`) for the
//! provenance's `vcs` metadata: the work tree's remote URL (credentials redacted), its commit
//! (`-dirty` with `BUILDX_GIT_CHECK_DIRTY`), and where the context and the Dockerfile's
//! directory are in the work tree. `BUILDX_GIT_INFO=0` turns it off.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `vcs` facts of a build from `context` with the Dockerfile at `dockerfile` (`None`:
/// the context's), under `env` (the process environment: `BUILDX_GIT_INFO`,
/// `BUILDX_GIT_CHECK_DIRTY`). Empty when the context is not in a git work tree. An error, as
/// buildx, when the context has a `.git` directory git cannot read.
pub fn vcs_of(
    context: &Path,
    dockerfile: Option<&Path>,
    env: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    let flag = |name: &str, default: bool| {
        env.get(name)
            .and_then(|v| ossb_protocol::parse_bool(v))
            .unwrap_or(default)
    };
    let mut out = BTreeMap::new();
    if !flag("BUILDX_GIT_INFO", true) {
        return Ok(out);
    }
    let Ok(wd) = std::path::absolute(context) else {
        return Ok(out);
    };
    let has_git_dir = wd.join(".git").is_dir();
    // git finds a work tree by a `.git` in the directory or one above it (or by GIT_DIR):
    // without one there is nothing to ask git, and no process to start on every build.
    let in_a_repo = wd.ancestors().any(|d| d.join(".git").exists())
        || env.contains_key("GIT_DIR")
        || std::env::var_os("GIT_DIR").is_some();
    if !in_a_repo {
        return Ok(out);
    }
    let git = Git { dir: wd.clone() };
    match git.run(&["rev-parse", "--is-inside-work-tree"]) {
        Err(GitError::Missing) if has_git_dir => {
            return Err("git was not found in the system".into())
        }
        Ok(inside) if inside == "true" => {}
        _ if has_git_dir => return Err(
            "failed to read current commit information with git rev-parse --is-inside-work-tree"
                .into(),
        ),
        _ => return Ok(out),
    }
    let root = git
        .run(&["rev-parse", "--show-toplevel"])
        .map_err(|e| format!("failed to get git root dir: {e}"))?;
    match git.run(&["show", "--format=%H", "HEAD", "--quiet", "--"]) {
        Ok(commit) if !commit.is_empty() => {
            let dirty = flag("BUILDX_GIT_CHECK_DIRTY", false)
                && git
                    .run(&["status", "--porcelain", "--ignored"])
                    .map_or(true, |s| !s.is_empty());
            let suffix = if dirty { "-dirty" } else { "" };
            out.insert("revision".into(), format!("{commit}{suffix}"));
        }
        // A repository without a commit yet.
        Ok(_) => {}
        Err(GitError::Failed(e)) if unknown_revision(&e) => {}
        Err(e) => return Err(format!("failed to get git commit: {e}")),
    }
    if let Some(url) = git.remote_url() {
        out.insert("source".into(), ossb_attest::redact_credentials(&url));
    }
    // Where each local directory the build reads is in the work tree (buildx's
    // `vcs:localdir:NAME`), so a reader can find the Dockerfile in the repository.
    let root = std::fs::canonicalize(&root).unwrap_or_else(|_| PathBuf::from(&root));
    let dockerfile_dir = dockerfile
        .and_then(Path::parent)
        .map(|d| {
            if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            }
        })
        .unwrap_or(context);
    for (name, dir) in [("context", context), ("dockerfile", dockerfile_dir)] {
        let Ok(dir) = std::fs::canonicalize(dir) else {
            continue;
        };
        if let Ok(rel) = dir.strip_prefix(&root) {
            let rel = rel.to_string_lossy();
            let rel = if rel.is_empty() { ".".into() } else { rel };
            out.insert(format!("localdir:{name}"), rel.into_owned());
        }
    }
    Ok(out)
}

enum GitError {
    /// No `git` to run.
    Missing,
    /// It ran and failed: its error output.
    Failed(String),
}

impl std::fmt::Display for GitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GitError::Missing => f.write_str("git was not found in the system"),
            GitError::Failed(e) => f.write_str(e),
        }
    }
}

struct Git {
    dir: PathBuf,
}

impl Git {
    /// The first line of `git ARGS`' output, quotes dropped, as buildx's `clean`.
    fn run(&self, args: &[&str]) -> Result<String, GitError> {
        let out = Command::new("git")
            .args(["-c", "log.showSignature=false"])
            .args(args)
            .current_dir(&self.dir)
            // Never a prompt for credentials or a pager: these are local queries.
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_PAGER", "cat")
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => GitError::Missing,
                _ => GitError::Failed(e.to_string()),
            })?;
        if !out.status.success() {
            return Err(GitError::Failed(
                String::from_utf8_lossy(&out.stderr).trim_end().to_string(),
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.lines().next().unwrap_or("").replace('\'', ""))
    }

    /// The remote of the branch's upstream, else `origin`, else `upstream`, as buildx.
    fn remote_url(&self) -> Option<String> {
        let tracked = self
            .run(&["symbolic-ref", "-q", "HEAD"])
            .ok()
            .filter(|r| !r.is_empty())
            .and_then(|r| {
                self.run(&["for-each-ref", "--format=%(upstream:remotename)", &r])
                    .ok()
            })
            .filter(|r| !r.is_empty());
        tracked
            .into_iter()
            .chain(["origin".to_string(), "upstream".to_string()])
            .find_map(|remote| {
                self.run(&["remote", "get-url", &remote])
                    .ok()
                    .filter(|u| !u.is_empty())
            })
    }
}

/// git's words for a HEAD that names no commit (an empty repository).
fn unknown_revision(stderr: &str) -> bool {
    let e = stderr.to_lowercase();
    e.contains("unknown revision or path not in the working tree") || e.contains("bad revision")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) {
        let ok = Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@e",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(dir)
            .status()
            .expect("git runs")
            .success();
        assert!(ok, "git {args:?}");
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_work_tree_gives_its_redacted_remote_commit_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        git(root, &["init", "-q"]);
        std::fs::create_dir(root.join("app")).unwrap();
        std::fs::write(root.join("app/Dockerfile"), "FROM scratch\n").unwrap();
        git(root, &["add", "."]);
        git(root, &["commit", "-q", "-m", "one"]);
        git(
            root,
            &[
                "remote",
                "add",
                "origin",
                "https://bob:hunter2@example.com/o/r.git",
            ],
        );
        let vcs = vcs_of(&root.join("app"), None, &env(&[])).unwrap();
        assert_eq!(vcs["source"], "https://xxxxx:xxxxx@example.com/o/r.git");
        assert_eq!(vcs["revision"].len(), 40, "{vcs:?}");
        assert_eq!(vcs["localdir:context"], "app");
        assert_eq!(vcs["localdir:dockerfile"], "app");
        assert!(!format!("{vcs:?}").contains("hunter2"));
        // Dirty only when asked to check.
        std::fs::write(root.join("app/new"), "x").unwrap();
        assert!(!vcs_of(root, None, &env(&[])).unwrap()["revision"].ends_with("-dirty"));
        let checked = vcs_of(root, None, &env(&[("BUILDX_GIT_CHECK_DIRTY", "1")])).unwrap();
        assert!(checked["revision"].ends_with("-dirty"), "{checked:?}");
        assert!(vcs_of(root, None, &env(&[("BUILDX_GIT_INFO", "0")]))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_plain_directory_or_an_empty_repository_gives_what_there_is() {
        let dir = tempfile::tempdir().unwrap();
        assert!(vcs_of(dir.path(), None, &env(&[])).unwrap().is_empty());
        git(dir.path(), &["init", "-q"]);
        let vcs = vcs_of(dir.path(), None, &env(&[])).unwrap();
        assert!(
            !vcs.contains_key("revision") && !vcs.contains_key("source"),
            "{vcs:?}"
        );
        // A .git git cannot read is an error, as in buildx.
        let broken = tempfile::tempdir().unwrap();
        std::fs::create_dir(broken.path().join(".git")).unwrap();
        assert!(vcs_of(broken.path(), None, &env(&[])).is_err());
    }
}
