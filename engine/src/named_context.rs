//! `--build-context NAME=VALUE`: what a named context is made of, parsed as buildx parses it.
//! Resolving one for a platform (pulling, loading, fetching) is the stage's
//! (`stage/context.rs`); the planner decides where a name refers to one
//! (`ossb_dockerfile::context_name`).

use std::path::PathBuf;

use ossb_image::oci::Descriptor;
use ossb_protocol::Digest;

/// What a named context is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContextSource {
    /// A local directory (its own `.dockerignore` applies, as in BuildKit).
    Dir(PathBuf),
    /// `docker-image://REF`: an image from a registry, resolved for the build's platform.
    Image(String),
    /// `oci-layout://PATH[:TAG][@DIGEST]`: an image in an OCI layout directory.
    OciLayout {
        /// The layout directory.
        path: PathBuf,
        /// The tag (`latest` when neither tag nor digest is given).
        tag: Option<String>,
        /// The digest (wins over the tag).
        digest: Option<Digest>,
    },
    /// `https://.../x.tar.gz`: a download; an archive is unpacked into a directory, any other
    /// file is the directory's one file, `context` (as BuildKit names it).
    Url(String),
    /// A git repository (`https://host/repo.git#ref:subdir`, `git@host:repo.git`): its
    /// checkout as a directory.
    Git(String),
    /// An image an earlier build of the same cache directory made (a bake target's, for
    /// `target:NAME`): its blobs are in the store.
    Built {
        /// The target that built it.
        target: String,
        /// Its manifest or index.
        image: Descriptor,
    },
}

/// The name a directory context's files travel under, as buildx names the local: `context`
/// and `dockerfile` are the build's own.
pub fn local_name(name: &str) -> String {
    match name {
        "context" | "dockerfile" => format!("_{name}"),
        _ => name.to_string(),
    }
}

/// Why a `--build-context` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--build-context {spec}: {detail}")]
pub struct ContextError {
    /// What was given.
    pub spec: String,
    /// What is wrong and what to do.
    pub detail: String,
}

impl ContextSource {
    /// Parses VALUE of `--build-context NAME=VALUE` as buildx does: a scheme (`docker-image://`,
    /// `oci-layout://`, `http(s)://`, `git@`, `git://`), else a local directory.
    pub fn parse(value: &str) -> Result<ContextSource, String> {
        if let Some(reference) = value.strip_prefix("docker-image://") {
            ossb_image::registry::parse_reference(reference).map_err(|e| {
                format!("docker-image://{reference} is not an image reference ({e}): write docker-image://[registry/]repository[:tag][@digest]")
            })?;
            return Ok(ContextSource::Image(reference.to_string()));
        }
        if let Some(rest) = value.strip_prefix("oci-layout://") {
            return parse_oci_layout(rest);
        }
        if value.starts_with("git@") || value.starts_with("git://") || is_git_url(value) {
            return Ok(ContextSource::Git(value.to_string()));
        }
        if value.starts_with("https://") || value.starts_with("http://") {
            return Ok(ContextSource::Url(value.to_string()));
        }
        if let Some((scheme, _)) = value.split_once("://") {
            return Err(format!(
                "unsupported context source {scheme}://: use a directory, docker-image://, oci-layout://, an https:// tarball or a git URL"
            ));
        }
        if value.starts_with("target:") {
            return Err(
                "target: contexts name a bake target: they work in `ossb bake`, not in `ossb build`"
                    .into(),
            );
        }
        let dir = PathBuf::from(value);
        if !dir.is_dir() {
            return Err(format!(
                "{value} is not a directory (nor docker-image://, oci-layout://, an https:// tarball or a git URL)"
            ));
        }
        Ok(ContextSource::Dir(dir))
    }

    /// The value as buildx hands it to BuildKit's frontend and provenance records it
    /// (`context:NAME` in the request's args; a URL's password left out by the writer): a
    /// directory as `local:` and the name its files travel under ([`local_name`]), an OCI
    /// layout with the context's name standing for buildx's random store id (never a path of
    /// this machine); the others as written, which is also how a cluster's spec carries them.
    pub fn provenance_value(&self, name: &str) -> String {
        match self {
            ContextSource::Dir(_) => format!("local:{}", local_name(name)),
            ContextSource::Image(r) => format!("docker-image://{r}"),
            ContextSource::OciLayout { tag, digest, .. } => {
                let mut s = format!("oci-layout://{name}");
                if let Some(t) = tag {
                    s.push(':');
                    s.push_str(t);
                }
                if let Some(d) = digest {
                    s.push('@');
                    s.push_str(&d.to_string());
                }
                s
            }
            ContextSource::Url(u) | ContextSource::Git(u) => u.clone(),
            ContextSource::Built { target, .. } => format!("target:{target}"),
        }
    }

    /// Whether it is files (a directory) rather than an image with a config.
    pub fn is_files(&self) -> bool {
        matches!(
            self,
            ContextSource::Dir(_) | ContextSource::Url(_) | ContextSource::Git(_)
        )
    }
}

/// `NAME=VALUE`: the name as BuildKit matches it (`ossb_dockerfile::context_name`) and the
/// source.
pub fn parse_build_context(spec: &str) -> Result<(String, ContextSource), ContextError> {
    let err = |detail: String| ContextError {
        spec: ossb_protocol::clip(spec, 300).into_owned(),
        detail,
    };
    let (name, value) = spec
        .split_once('=')
        .ok_or_else(|| err("expected NAME=VALUE".into()))?;
    ossb_image::registry::parse_reference(name).map_err(|e| {
        err(format!(
            "invalid context name {name:?} ({e}): a name is written as an image name, in lower case"
        ))
    })?;
    let source = ContextSource::parse(value).map_err(err)?;
    Ok((ossb_dockerfile::context_name(name), source))
}

/// An `http(s)://` URL that names a git repository (BuildKit's rule: the path ends in `.git`,
/// before any `#ref:subdir`).
fn is_git_url(value: &str) -> bool {
    (value.starts_with("https://") || value.starts_with("http://"))
        && value
            .split('#')
            .next()
            .is_some_and(|u| u.split('?').next().unwrap_or(u).ends_with(".git"))
}

/// `PATH[:TAG][@DIGEST]` as buildx's `ocilayout.Parse`: the digest after the last `@`, the tag
/// after the last `:` when it is a valid tag; `latest` when neither is given.
fn parse_oci_layout(rest: &str) -> Result<ContextSource, String> {
    let mut path = rest;
    let mut digest = None;
    if let Some((before, after)) = path.rsplit_once('@') {
        if after.starts_with("sha256:") {
            digest = Some(after.parse::<Digest>().map_err(|e| {
                format!("oci-layout://{rest}: {after} is not a sha256 digest ({e})")
            })?);
            path = before;
        }
    }
    let mut tag = None;
    if let Some((before, after)) = path.rsplit_once(':') {
        let valid = !after.is_empty()
            && after.len() <= 128
            && after.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphanumeric() || c == '_' || (i > 0 && (c == '.' || c == '-'))
            });
        if valid {
            tag = Some(after.to_string());
            path = before;
        }
    }
    if path.is_empty() {
        return Err(
            "oci-layout:// needs a directory: oci-layout://PATH[:TAG][@sha256:DIGEST]".into(),
        );
    }
    if tag.is_none() && digest.is_none() {
        tag = Some("latest".into());
    }
    Ok(ContextSource::OciLayout {
        path: PathBuf::from(path),
        tag,
        digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind_as_buildx() {
        let d = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let layout = |p: &str, t: Option<&str>, dg: Option<&str>| ContextSource::OciLayout {
            path: p.into(),
            tag: t.map(Into::into),
            digest: dg.map(|x| x.parse().unwrap()),
        };
        let cases = [
            ("oci-layout:///path/to/layout", layout("/path/to/layout", Some("latest"), None)),
            ("oci-layout:///path/to/layout:1.3", layout("/path/to/layout", Some("1.3"), None)),
            (&format!("oci-layout:///p/@/l@{d}"), layout("/p/@/l", None, Some(d))),
            (&format!("oci-layout://a:1.3@{d}"), layout("a", Some("1.3"), Some(d))),
            ("oci-layout:///p/@/l", layout("/p/@/l", Some("latest"), None)),
            ("docker-image://alpine@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", ContextSource::Image(format!("alpine@{d}"))),
            ("https://example.com/repo.git#main:sub", ContextSource::Git("https://example.com/repo.git#main:sub".into())),
            ("git@github.com:moby/buildkit.git", ContextSource::Git("git@github.com:moby/buildkit.git".into())),
            ("https://example.com/x.tar.gz", ContextSource::Url("https://example.com/x.tar.gz".into())),
        ];
        for (given, want) in cases {
            assert_eq!(ContextSource::parse(given).unwrap(), want, "{given}");
        }
    }

    #[test]
    fn refuses_what_cannot_be_a_context() {
        for (spec, says) in [
            (
                "base=ftp://example.com/x",
                "unsupported context source ftp://",
            ),
            ("base=/does/not/exist", "is not a directory"),
            ("base=docker-image://Bad Ref", "is not an image reference"),
            ("Base=/tmp", "invalid context name"),
            ("base", "expected NAME=VALUE"),
            ("base=target:other", "ossb bake"),
        ] {
            let e = parse_build_context(spec).unwrap_err().to_string();
            assert!(e.contains(says), "{spec}: {e}");
        }
        let (name, _) = parse_build_context("docker.io/library/alpine:latest=/tmp").unwrap();
        assert_eq!(name, "alpine");
    }
}
