//! Registry credentials and the authentication handshake.
//!
//! Credentials come from a Docker config file, read the way the Docker CLI reads it:
//! `credHelpers[host]` first, then `credsStore`, then `auths[host]`. The same file format is
//! what a Kubernetes `kubernetes.io/dockerconfigjson` Secret holds, so a Secret mounted as a
//! file works as it is (the older `.dockercfg` form, a bare map of hosts, is read too).
//!
//! Which file: [`CredentialFiles::from_env`] looks at `$DOCKER_CONFIG/config.json`, then
//! `$DOCKER_CONFIG/.dockerconfigjson` (a Secret mounted as a directory), then
//! `~/.docker/config.json`; an explicit file given in
//! [`RegistryOptions::auth_file`](super::RegistryOptions::auth_file) comes first.
//!
//! The handshake: a registry answers 401 with `WWW-Authenticate`. `Basic` gets the username
//! and password; `Bearer realm=...,service=...` sends us to a token server, which is asked for
//! one token covering every scope the operation needs (for a cross-repository mount: pull on
//! the source and push on the target). With an identity token (what `docker login` stores for
//! registries using OAuth2) the token server is asked with the refresh-token grant.
//!
//! Secrets never reach a log line or an error message: [`Credential`]'s `Debug` is redacted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use serde::Deserialize;

/// What we authenticate to one registry with.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum Credential {
    /// No credentials: anonymous pulls, and a token server's anonymous tokens.
    #[default]
    Anonymous,
    /// A username and password (Basic auth, or the token server's Basic-authenticated GET).
    Basic {
        /// The username.
        username: String,
        /// The password.
        password: String,
    },
    /// An OAuth2 refresh token (`identitytoken` in the Docker config).
    IdentityToken(String),
    /// A bearer token used as is (`registrytoken` in the Docker config).
    RegistryToken(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Anonymous => f.write_str("Anonymous"),
            Credential::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credential::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
            Credential::RegistryToken(_) => f.write_str("RegistryToken(<redacted>)"),
        }
    }
}

/// Why credentials could not be read. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The config file exists but is not valid JSON of the expected shape.
    #[error("cannot read the registry credentials in {path}: {detail}\n  hint: the file must be a Docker config.json (or a kubernetes.io/dockerconfigjson Secret's content)")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A credential helper failed.
    #[error("credential helper docker-credential-{helper} failed for {registry}: {detail}\n  hint: check that docker-credential-{helper} is installed and on PATH, or remove it from credHelpers/credsStore")]
    Helper {
        /// The helper's name.
        helper: String,
        /// The registry asked about.
        registry: String,
        /// What went wrong (its stderr, never its stdout).
        detail: String,
    },
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

/// The Docker config (or mounted Secret) that credentials are read from.
#[derive(Debug, Default)]
pub struct CredentialFiles {
    config: ConfigFile,
    path: Option<PathBuf>,
}

impl CredentialFiles {
    /// Reads the first file that exists: `explicit`, `$DOCKER_CONFIG/config.json`,
    /// `$DOCKER_CONFIG/.dockerconfigjson`, `$HOME/.docker/config.json`. None: anonymous.
    pub fn from_env(explicit: Option<&Path>) -> Result<CredentialFiles, CredentialError> {
        let mut candidates = Vec::new();
        if let Some(p) = explicit {
            candidates.push(p.to_path_buf());
        }
        if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
            let dir = PathBuf::from(dir);
            candidates.push(dir.join("config.json"));
            candidates.push(dir.join(".dockerconfigjson"));
        } else if let Some(home) = std::env::var_os("HOME") {
            candidates.push(PathBuf::from(home).join(".docker/config.json"));
        }
        for path in candidates {
            match std::fs::read(&path) {
                Ok(bytes) => return CredentialFiles::parse(&bytes, &path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(CredentialError::BadFile {
                        path,
                        detail: e.to_string(),
                    })
                }
            }
        }
        Ok(CredentialFiles::default())
    }

    /// Parses a config file's bytes (`path` names it in errors).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<CredentialFiles, CredentialError> {
        let bad = |e: serde_json::Error| CredentialError::BadFile {
            path: path.to_path_buf(),
            // serde's message names the line and column, never the content.
            detail: e.to_string(),
        };
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(bad)?;
        let known = ["auths", "credHelpers", "credsStore"];
        let is_legacy = value
            .as_object()
            .is_some_and(|o| !o.is_empty() && !o.keys().any(|k| known.contains(&k.as_str())));
        let config = if is_legacy {
            // `.dockercfg`: the auths map itself at the top level.
            ConfigFile {
                auths: serde_json::from_value(value).map_err(bad)?,
                ..Default::default()
            }
        } else {
            serde_json::from_value(value).map_err(bad)?
        };
        Ok(CredentialFiles {
            config,
            path: Some(path.to_path_buf()),
        })
    }

    /// The file the credentials came from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The credential for `registry` (`host[:port]`, `docker.io` for Docker Hub).
    pub fn lookup(&self, registry: &str) -> Result<Credential, CredentialError> {
        let host = normalize_host(registry);
        if let Some(helper) = self
            .config
            .cred_helpers
            .iter()
            .find(|(k, _)| normalize_host(k) == host)
            .map(|(_, v)| v)
        {
            return helper_get(helper, registry);
        }
        if let Some(store) = &self.config.creds_store {
            let found = helper_get(store, registry)?;
            if found != Credential::Anonymous {
                return Ok(found);
            }
        }
        let entry = self
            .config
            .auths
            .iter()
            .find(|(k, _)| normalize_host(k) == host)
            .map(|(_, v)| v.clone());
        Ok(entry.map(from_entry).unwrap_or_default())
    }
}

fn from_entry(e: AuthEntry) -> Credential {
    if let Some(t) = e.identitytoken.filter(|t| !t.is_empty()) {
        return Credential::IdentityToken(t);
    }
    if let Some(t) = e.registrytoken.filter(|t| !t.is_empty()) {
        return Credential::RegistryToken(t);
    }
    if let (Some(username), Some(password)) = (e.username.clone(), e.password.clone()) {
        if !username.is_empty() {
            return Credential::Basic { username, password };
        }
    }
    let decoded = e
        .auth
        .as_deref()
        .and_then(|a| {
            base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok());
    match decoded.as_deref().and_then(|s| s.split_once(':')) {
        Some((u, p)) if !u.is_empty() => Credential::Basic {
            username: u.to_string(),
            password: p.to_string(),
        },
        _ => Credential::Anonymous,
    }
}

/// `https://index.docker.io/v1/`, `http://host:5000`, `host:5000/v2/` all name `host:5000`;
/// Docker Hub's spellings all name `docker.io`.
pub fn normalize_host(key: &str) -> String {
    let s = key.trim();
    let s = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    let host = s.split('/').next().unwrap_or(s).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

/// The server name a credential helper knows Docker Hub by.
fn helper_server(registry: &str) -> String {
    if normalize_host(registry) == "docker.io" {
        "https://index.docker.io/v1/".into()
    } else {
        registry.to_string()
    }
}

fn helper_get(helper: &str, registry: &str) -> Result<Credential, CredentialError> {
    let program = format!("docker-credential-{helper}");
    let fail = |detail: String| CredentialError::Helper {
        helper: helper.to_string(),
        registry: registry.to_string(),
        detail,
    };
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run {program}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        // A helper that exits early closes its stdin; its exit status tells the story.
        let _ = stdin.write_all(helper_server(registry).as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("{program}: {e}")))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if text.to_ascii_lowercase().contains("credentials not found") {
            return Ok(Credential::Anonymous);
        }
        return Err(fail(format!(
            "exit status {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    #[derive(Deserialize)]
    struct HelperAnswer {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    let answer: HelperAnswer = serde_json::from_slice(&out.stdout)
        .map_err(|e| fail(format!("its answer is not JSON: {e}")))?;
    Ok(match (answer.username.as_str(), answer.secret) {
        (_, s) if s.is_empty() => Credential::Anonymous,
        ("<token>", s) => Credential::IdentityToken(s),
        (u, s) => Credential::Basic {
            username: u.to_string(),
            password: s,
        },
    })
}

/// A `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    /// Basic auth.
    Basic,
    /// A token server.
    Bearer {
        /// The token endpoint.
        realm: String,
        /// The `service` parameter to send.
        service: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` header value; `None` for schemes we do not speak.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => {
            let params = parse_params(rest);
            Some(Challenge::Bearer {
                realm: params.get("realm")?.clone(),
                service: params.get("service").cloned(),
            })
        }
        _ => None,
    }
}

/// `key="value", key2=value2` into a map (quoted values may hold commas).
fn parse_params(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ','))
            .collect::<String>()
            .trim()
            .to_ascii_lowercase();
        if key.is_empty() {
            break;
        }
        if chars.next_if_eq(&'=').is_none() {
            continue;
        }
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ','))
                .collect::<String>()
                .trim()
                .to_string();
        }
        out.insert(key, value);
    }
    out
}

/// The token server's answer.
#[derive(Debug, Deserialize)]
pub(crate) struct TokenAnswer {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl TokenAnswer {
    pub fn token(self) -> Option<String> {
        self.token
            .filter(|t| !t.is_empty())
            .or(self.access_token.filter(|t| !t.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(json: &str) -> CredentialFiles {
        CredentialFiles::parse(json.as_bytes(), Path::new("config.json")).unwrap()
    }

    #[test]
    fn reads_auths_in_every_spelling() {
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        let f = files(&format!(
            r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},"http://reg.example:5000/v2/":{{"username":"bob","password":"pw"}},"oauth.example":{{"auth":"","identitytoken":"refresh"}}}}}}"#
        ));
        assert_eq!(
            f.lookup("docker.io").unwrap(),
            Credential::Basic {
                username: "alice".into(),
                password: "s3cret".into()
            }
        );
        assert_eq!(
            f.lookup("reg.example:5000").unwrap(),
            Credential::Basic {
                username: "bob".into(),
                password: "pw".into()
            }
        );
        assert_eq!(
            f.lookup("oauth.example").unwrap(),
            Credential::IdentityToken("refresh".into())
        );
        assert_eq!(f.lookup("other.example").unwrap(), Credential::Anonymous);
    }

    #[test]
    fn reads_a_legacy_dockercfg_secret() {
        let auth = base64::engine::general_purpose::STANDARD.encode("u:p");
        let f = files(&format!(r#"{{"reg.example":{{"auth":"{auth}"}}}}"#));
        assert!(matches!(
            f.lookup("reg.example").unwrap(),
            Credential::Basic { .. }
        ));
    }

    #[test]
    fn credential_helpers_are_asked_first() {
        let dir = tempfile::tempdir().unwrap();
        let helper = dir.path().join("docker-credential-ossbtest");
        std::fs::write(
            &helper,
            "#!/bin/sh\nread server\nif [ \"$server\" = helped.example ]; then echo '{\"Username\":\"<token>\",\"Secret\":\"idtok\"}'; else echo 'credentials not found in native keychain'; exit 1; fi\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!(
            "{}:{}",
            dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        // The helper is found on PATH; run the lookups with it prepended.
        let old = std::env::var_os("PATH");
        std::env::set_var("PATH", &path);
        let f = files(
            r#"{"credHelpers":{"helped.example":"ossbtest"},"credsStore":"ossbtest","auths":{"plain.example":{"username":"u","password":"p"}}}"#,
        );
        let helped = f.lookup("helped.example").unwrap();
        let fallback = f.lookup("plain.example").unwrap();
        if let Some(old) = old {
            std::env::set_var("PATH", old);
        }
        assert_eq!(helped, Credential::IdentityToken("idtok".into()));
        assert!(matches!(fallback, Credential::Basic { .. }));
    }

    #[test]
    fn debug_never_shows_secrets() {
        let c = Credential::Basic {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{:?}", Credential::IdentityToken("tok".into())).contains("tok"));
    }

    #[test]
    fn parses_challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into())
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
    }
}
