//! A token server of the tests' own, for the Bearer flow of the distribution spec: it issues
//! tokens for the scopes asked (`GET /token?service=..&scope=..` with Basic credentials or
//! anonymously, or `POST /token` with the refresh-token grant of an identity token), and
//! [`TokenAuthority::check`] is what the [`fault_proxy`](crate::fault_proxy) uses to demand
//! them in front of the plain registry.
//!
//! Policy: the user with the right password, or the right identity token, gets every scope
//! asked for; anonymous clients get `pull` only.

use std::collections::HashMap;
use std::io::BufReader;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use crate::fault_proxy::{read_body, read_head, respond};

/// One token request the server answered.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub method: String,
    /// The scopes asked for.
    pub scopes: Vec<String>,
    /// `basic`, `refresh_token`, `anonymous` or `refused`.
    pub how: String,
}

/// Issues and checks tokens.
pub struct TokenAuthority {
    pub realm: String,
    user: String,
    password: String,
    identity_token: String,
    /// token -> the scopes it grants.
    tokens: Mutex<HashMap<String, Vec<String>>>,
    requests: Mutex<Vec<TokenRequest>>,
    counter: Mutex<u64>,
}

impl TokenAuthority {
    /// Starts the token server on a free loopback port.
    pub fn start(user: &str, password: &str, identity_token: &str) -> Arc<TokenAuthority> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        let authority = Arc::new(TokenAuthority {
            realm,
            user: user.into(),
            password: password.into(),
            identity_token: identity_token.into(),
            tokens: Mutex::new(HashMap::new()),
            requests: Mutex::new(Vec::new()),
            counter: Mutex::new(0),
        });
        let a = authority.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let a = a.clone();
                std::thread::spawn(move || a.serve(conn));
            }
        });
        authority
    }

    /// The token requests answered so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.requests.lock().unwrap().clone()
    }

    fn serve(&self, conn: std::net::TcpStream) {
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut out = conn;
        let Ok(Some(head)) = read_head(&mut reader) else {
            return;
        };
        let body = read_body(&mut reader, &head).unwrap_or_default();
        let mut parts = head.first_line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("");
        let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
        let params = if method == "POST" {
            parse_form(&String::from_utf8_lossy(&body))
        } else {
            parse_form(query)
        };
        let mut scopes: Vec<String> = params
            .iter()
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
            .filter(|s| !s.is_empty())
            .collect();
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let how = if method == "POST" {
            if get("grant_type").as_deref() == Some("refresh_token")
                && get("refresh_token").as_deref() == Some(self.identity_token.as_str())
            {
                "refresh_token"
            } else {
                "refused"
            }
        } else {
            match head.header("authorization") {
                None => "anonymous",
                Some(a) if a == basic(&self.user, &self.password) => "basic",
                Some(_) => "refused",
            }
        };
        self.requests.lock().unwrap().push(TokenRequest {
            method: method.clone(),
            scopes: scopes.clone(),
            how: how.into(),
        });
        if how == "refused" {
            respond(
                &mut out,
                401,
                &[],
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#,
            );
            return;
        }
        if how == "anonymous" {
            scopes = scopes
                .iter()
                .filter_map(|s| {
                    let (prefix, actions) = s.rsplit_once(':')?;
                    actions
                        .split(',')
                        .any(|a| a == "pull")
                        .then(|| format!("{prefix}:pull"))
                })
                .collect();
        }
        let token = {
            let mut c = self.counter.lock().unwrap();
            *c += 1;
            format!("tok{}x{}", *c, std::process::id())
        };
        self.tokens.lock().unwrap().insert(token.clone(), scopes);
        let body = format!(r#"{{"token":"{token}","access_token":"{token}","expires_in":300}}"#);
        respond(
            &mut out,
            200,
            &[("Content-Type", "application/json".into())],
            body.as_bytes(),
        );
    }

    /// Whether a request to the registry may pass; else the challenge to answer with.
    pub fn check(
        &self,
        method: &str,
        path: &str,
        authorization: Option<&str>,
    ) -> Result<(), String> {
        let (name, from) = repository_of(path);
        let action = if method == "GET" || method == "HEAD" {
            "pull"
        } else {
            "push"
        };
        let mut needed = Vec::new();
        if let Some(name) = &name {
            needed.push(format!("repository:{name}:{action}"));
        }
        if let Some(from) = from {
            needed.push(format!("repository:{from}:pull"));
        }
        let challenge = format!(
            r#"Bearer realm="{}",service="ossb-test-registry"{}"#,
            self.realm,
            needed
                .first()
                .map(|s| format!(r#",scope="{s}""#))
                .unwrap_or_default()
        );
        let token = authorization
            .and_then(|a| a.strip_prefix("Bearer "))
            .ok_or(challenge.clone())?;
        let tokens = self.tokens.lock().unwrap();
        let granted = tokens.get(token).ok_or(challenge.clone())?;
        let ok = needed.iter().all(|need| {
            let (prefix, action) = need.rsplit_once(':').unwrap();
            granted.iter().any(|g| {
                g.rsplit_once(':')
                    .is_some_and(|(p, acts)| p == prefix && acts.split(',').any(|a| a == action))
            })
        });
        if ok {
            Ok(())
        } else {
            Err(challenge)
        }
    }
}

/// `/v2/NAME/{manifests,blobs,tags}/...` -> NAME, and the `from=` of a mount.
fn repository_of(path: &str) -> (Option<String>, Option<String>) {
    let (p, query) = path.split_once('?').unwrap_or((path, ""));
    let rest = p.strip_prefix("/v2/").unwrap_or("");
    let name = ["/manifests/", "/blobs/", "/tags/"]
        .iter()
        .filter_map(|sep| rest.rfind(sep).map(|i| rest[..i].to_string()))
        .min_by_key(|s| s.len());
    let from = parse_form(query)
        .into_iter()
        .find(|(k, _)| k == "from")
        .map(|(_, v)| v);
    (name, from)
}

fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", crate::base64(&format!("{user}:{password}")))
}
