//! The HTTP side of the distribution API: one reqwest client per registry host (with that
//! host's CA and scheme), authentication on demand, and retries with backoff.
//!
//! Requests are made by closures so that they can be sent again: after a 401 (with the
//! credentials the challenge asks for) and after a transient failure. [`Transport::send`]
//! does the authentication; [`retry`] does the retrying.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, RequestBuilder, Response, StatusCode};

use super::auth::{parse_challenge, Challenge, Credential, CredentialFiles, TokenAnswer};
use super::{RetryPolicy, Settings};

/// A failure of one request (after authentication, before retrying).
#[derive(Debug)]
pub(crate) enum HttpError {
    /// The registry answered with an error status.
    Status {
        status: StatusCode,
        /// The registry's error body, shortened.
        body: String,
        retry_after: Option<Duration>,
        url: String,
    },
    /// The request never got an answer, or the body broke off.
    Transport { detail: String, url: String },
    /// The bytes received do not hash to what was asked for.
    WrongBytes { detail: String },
    /// Authentication failed (no or refused credentials, token server failure).
    Auth { detail: String },
    /// A local file failed (reading a blob to push, writing one pulled).
    Local(crate::store::StoreError),
    /// The registry answered something the protocol does not allow.
    Protocol { detail: String },
}

impl HttpError {
    /// Whether trying again may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            HttpError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::REQUEST_TIMEOUT
            }
            HttpError::Transport { .. } | HttpError::WrongBytes { .. } => true,
            _ => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            HttpError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// What the registry (or the network) said, on one line.
    pub fn detail(&self) -> String {
        match self {
            HttpError::Status {
                status, body, url, ..
            } => {
                if body.is_empty() {
                    format!("{status} from {url}")
                } else {
                    format!("{status} from {url}: {body}")
                }
            }
            HttpError::Transport { detail, url } => format!("{url}: {detail}"),
            HttpError::WrongBytes { detail }
            | HttpError::Auth { detail }
            | HttpError::Protocol { detail } => detail.clone(),
            HttpError::Local(e) => e.to_string(),
        }
    }

    pub fn transport(e: reqwest::Error) -> HttpError {
        let url = e.url().map(|u| redact_url(u.as_str())).unwrap_or_default();
        let mut e_no_url = e;
        e_no_url = e_no_url.without_url();
        HttpError::Transport {
            detail: describe(&e_no_url),
            url,
        }
    }
}

/// The error and its causes on one line: reqwest hides the useful part (connection refused,
/// certificate unknown, connection reset) in its source chain.
pub(crate) fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// URLs of uploads carry state tokens; none carries credentials, but keep them short.
fn redact_url(u: &str) -> String {
    match u.split_once('?') {
        Some((base, _)) => format!("{base}?..."),
        None => u.to_string(),
    }
}

/// A repository scope of a token: `repository:NAME:pull` or `repository:NAME:pull,push`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Scope {
    pub repository: String,
    pub push: bool,
}

impl Scope {
    pub fn pull(repository: &str) -> Scope {
        Scope {
            repository: repository.to_string(),
            push: false,
        }
    }

    pub fn push(repository: &str) -> Scope {
        Scope {
            repository: repository.to_string(),
            push: true,
        }
    }

    fn to_param(&self) -> String {
        let actions = if self.push { "pull,push" } else { "pull" };
        format!("repository:{}:{actions}", self.repository)
    }
}

struct Token {
    value: String,
    expires: Instant,
}

#[derive(Default)]
struct HostState {
    challenge: Option<Challenge>,
    /// Tokens by their scope list.
    tokens: HashMap<String, Token>,
}

/// Everything needed to talk to registries, shared by all requests of a build.
pub(crate) struct Transport {
    settings: Settings,
    credentials: CredentialFiles,
    clients: Mutex<HashMap<String, reqwest::Client>>,
    hosts: Mutex<HashMap<String, HostState>>,
    /// Credentials looked up per host (a helper runs once per host).
    creds: Mutex<HashMap<String, Credential>>,
    /// For each `--insecure-registry` host used so far: whether it speaks HTTPS (with a
    /// certificate that is then not verified) rather than plain HTTP.
    insecure_tls: tokio::sync::Mutex<HashMap<String, bool>>,
}

impl Transport {
    pub fn new(settings: Settings, credentials: CredentialFiles) -> Transport {
        Transport {
            settings,
            credentials,
            clients: Mutex::new(HashMap::new()),
            hosts: Mutex::new(HashMap::new()),
            creds: Mutex::new(HashMap::new()),
            insecure_tls: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    fn is_insecure(&self, host: &str) -> bool {
        self.settings.options.insecure.iter().any(|h| h == host)
    }

    /// Whether the insecure `host` speaks HTTPS, as Docker's insecure registries may: asked
    /// once per build. A registry answering plain HTTP as a registry (its API version header)
    /// is spoken to in plain HTTP without trying TLS (a TLS handshake costs its first use of
    /// the random generator, about 70 ms); otherwise `GET https://host/v2/` with any
    /// certificate, plain HTTP when TLS fails too.
    async fn speaks_tls(&self, host: &str, client: &reqwest::Client) -> bool {
        let mut known = self.insecure_tls.lock().await;
        if let Some(&tls) = known.get(host) {
            return tls;
        }
        let plain_url = self.base_url(host);
        let timeout = self.settings.config.connect_timeout;
        let plain = client
            .get(&plain_url)
            .timeout(timeout)
            .send()
            .await
            .is_ok_and(|r| r.headers().contains_key("docker-distribution-api-version"));
        let tls = !plain
            && client
                .get(plain_url.replacen("http://", "https://", 1))
                .timeout(timeout)
                .send()
                .await
                .is_ok();
        tracing::debug!(
            host,
            tls,
            "insecure registry: HTTPS without verification or plain HTTP"
        );
        known.insert(host.to_string(), tls);
        tls
    }

    /// `req` to an insecure host that speaks TLS goes to https:// (its URLs are made http://).
    async fn with_scheme(
        &self,
        host: &str,
        client: &reqwest::Client,
        req: RequestBuilder,
    ) -> Result<reqwest::Request, HttpError> {
        let mut req = req.build().map_err(HttpError::transport)?;
        if self.is_insecure(host)
            && req.url().scheme() == "http"
            && self.speaks_tls(host, client).await
        {
            let _ = req.url_mut().set_scheme("https");
        }
        Ok(req)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The base URL of `host`'s API, `https://host/v2/` or `http://` for insecure ones.
    pub fn base_url(&self, host: &str) -> String {
        let api_host = match host {
            "docker.io" | "index.docker.io" => "registry-1.docker.io",
            h => h,
        };
        let scheme = if self.is_insecure(host) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{api_host}/v2/")
    }

    /// The client for `host`, with the CA given for it.
    pub fn client(&self, host: &str) -> Result<reqwest::Client, HttpError> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(host) {
            return Ok(c.clone());
        }
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("ossb/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(self.settings.config.connect_timeout)
            .read_timeout(self.settings.config.read_timeout)
            .pool_max_idle_per_host(8)
            // An insecure registry that speaks TLS: its certificate is not checked.
            .danger_accept_invalid_certs(self.is_insecure(host));
        for (h, path) in &self.settings.options.certificates {
            if h == host {
                let pem = std::fs::read(path).map_err(|e| {
                    HttpError::Local(crate::store::StoreError::Io {
                        path: path.clone(),
                        source: e,
                    })
                })?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    HttpError::Protocol {
                        detail: format!(
                            "the certificate {} for {host} is not PEM: {e}",
                            path.display()
                        ),
                    }
                })?;
                for c in certs {
                    builder = builder.add_root_certificate(c);
                }
            }
        }
        let client = builder.build().map_err(HttpError::transport)?;
        clients.insert(host.to_string(), client.clone());
        Ok(client)
    }

    fn credential(&self, host: &str) -> Result<Credential, HttpError> {
        let mut creds = self.creds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = creds.get(host) {
            return Ok(c.clone());
        }
        let c = self.credentials.lookup(host).map_err(|e| HttpError::Auth {
            detail: e.to_string(),
        })?;
        creds.insert(host.to_string(), c.clone());
        Ok(c)
    }

    /// Sends the request `make` builds to `host`, authenticating for `scopes` when the
    /// registry asks (or already asked before). 401 after authenticating is an error.
    pub async fn send(
        &self,
        host: &str,
        scopes: &[Scope],
        make: &(dyn Fn(&reqwest::Client) -> RequestBuilder + Send + Sync),
    ) -> Result<Response, HttpError> {
        let client = self.client(host)?;
        let auth = self.authorization(host, scopes, false).await?;
        let mut req = make(&client);
        if let Some(a) = &auth {
            req = req.header(AUTHORIZATION, a);
        }
        let req = self.with_scheme(host, &client, req).await?;
        let resp = client.execute(req).await.map_err(HttpError::transport)?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge);
        let Some(challenge) = challenge else {
            return Err(status_error(resp).await);
        };
        {
            let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
            hosts.entry(host.to_string()).or_default().challenge = Some(challenge);
        }
        // When credentials were sent and refused, a cached token may have expired early:
        // ask for a fresh one, once. Credentials that do not change are an error.
        let fresh = self.authorization(host, scopes, auth.is_some()).await?;
        let Some(fresh) = fresh.filter(|f| Some(f) != auth.as_ref()) else {
            return Err(status_error(resp).await);
        };
        let req = self
            .with_scheme(host, &client, make(&client).header(AUTHORIZATION, fresh))
            .await?;
        let resp = client.execute(req).await.map_err(HttpError::transport)?;
        Ok(resp)
    }

    /// The Authorization header for `host` and `scopes`, if the host asked for one.
    async fn authorization(
        &self,
        host: &str,
        scopes: &[Scope],
        refresh: bool,
    ) -> Result<Option<String>, HttpError> {
        let challenge = {
            let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
            hosts.get(host).and_then(|s| s.challenge.clone())
        };
        let Some(challenge) = challenge else {
            return Ok(None);
        };
        let cred = self.credential(host)?;
        match challenge {
            Challenge::Basic => match cred {
                Credential::Basic { username, password } => Ok(Some(basic(&username, &password))),
                Credential::RegistryToken(t) => Ok(Some(format!("Bearer {t}"))),
                _ => Err(HttpError::Auth {
                    detail: format!(
                        "{host} asks for a username and password and none are configured"
                    ),
                }),
            },
            Challenge::Bearer { realm, service } => {
                if let Credential::RegistryToken(t) = &cred {
                    return Ok(Some(format!("Bearer {t}")));
                }
                let mut sorted: Vec<Scope> = scopes.to_vec();
                sorted.sort();
                sorted.dedup();
                let key = sorted
                    .iter()
                    .map(Scope::to_param)
                    .collect::<Vec<_>>()
                    .join(" ");
                if !refresh {
                    let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(t) = hosts.get(host).and_then(|s| s.tokens.get(&key)) {
                        if t.expires > Instant::now() {
                            return Ok(Some(format!("Bearer {}", t.value)));
                        }
                    }
                }
                let (value, lifetime) = self
                    .fetch_token(host, &realm, service.as_deref(), &sorted, &cred)
                    .await?;
                let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
                hosts.entry(host.to_string()).or_default().tokens.insert(
                    key,
                    Token {
                        value: value.clone(),
                        // Renewed a little early so a token never expires mid-request.
                        expires: Instant::now() + lifetime.saturating_sub(Duration::from_secs(10)),
                    },
                );
                Ok(Some(format!("Bearer {value}")))
            }
        }
    }

    async fn fetch_token(
        &self,
        host: &str,
        realm: &str,
        service: Option<&str>,
        scopes: &[Scope],
        cred: &Credential,
    ) -> Result<(String, Duration), HttpError> {
        let realm_host = reqwest::Url::parse(realm)
            .ok()
            .and_then(|u| {
                u.host_str().map(|h| match u.port() {
                    Some(p) => format!("{h}:{p}"),
                    None => h.to_string(),
                })
            })
            .ok_or_else(|| HttpError::Auth {
                detail: format!("{host} sent a token realm that is not a URL: {realm:?}"),
            })?;
        // The token server may need the same CA as the registry it serves.
        let client = if self
            .settings
            .options
            .certificates
            .iter()
            .any(|(h, _)| *h == realm_host)
        {
            self.client(&realm_host)?
        } else {
            self.client(host)?
        };
        let scope_params: Vec<(&str, String)> =
            scopes.iter().map(|s| ("scope", s.to_param())).collect();
        let mut params: Vec<(&str, String)> = Vec::new();
        if let Some(s) = service {
            params.push(("service", s.to_string()));
        }
        params.extend(scope_params);
        let req = match cred {
            Credential::IdentityToken(refresh) => {
                // OAuth2 refresh-token grant, as the Docker CLI does for identity tokens.
                let mut form = params.clone();
                form.push(("grant_type", "refresh_token".into()));
                form.push(("refresh_token", refresh.clone()));
                form.push(("client_id", "ossb".into()));
                let scope = scopes
                    .iter()
                    .map(Scope::to_param)
                    .collect::<Vec<_>>()
                    .join(" ");
                form.retain(|(k, _)| *k != "scope");
                form.push(("scope", scope));
                let body = form_encode(&form);
                client
                    .request(Method::POST, realm)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body)
            }
            Credential::Basic { username, password } => client
                .get(with_query(realm, &params))
                .header(AUTHORIZATION, basic(username, password)),
            _ => client.get(with_query(realm, &params)),
        };
        let resp = req.send().await.map_err(HttpError::transport)?;
        let status = resp.status();
        if !status.is_success() {
            let e = status_error(resp).await;
            return Err(
                if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                    e
                } else {
                    HttpError::Auth {
                        detail: format!("the token server refused: {}", e.detail()),
                    }
                },
            );
        }
        let bytes = resp.bytes().await.map_err(HttpError::transport)?;
        let answer: TokenAnswer = serde_json::from_slice(&bytes).map_err(|e| HttpError::Auth {
            detail: format!("the token server at {realm} answered with invalid JSON: {e}"),
        })?;
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(60).max(60));
        let token = answer.token().ok_or_else(|| HttpError::Auth {
            detail: format!("the token server at {realm} answered without a token"),
        })?;
        Ok((token, lifetime))
    }
}

fn basic(username: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
    )
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn form_encode(params: &[(&str, String)]) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// `url` with `params` added to its query.
pub(crate) fn with_query(url: &str, params: &[(&str, String)]) -> String {
    if params.is_empty() {
        return url.to_string();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{}", form_encode(params))
}

/// Turns an error answer into an [`HttpError::Status`], reading (a bounded part of) its body.
pub(crate) async fn status_error(resp: Response) -> HttpError {
    let status = resp.status();
    let url = redact_url(resp.url().as_str());
    let retry_after = parse_retry_after(resp.headers());
    let mut body = Vec::new();
    let mut resp = resp;
    while let Ok(Some(chunk)) = resp.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() > 4096 {
            break;
        }
    }
    HttpError::Status {
        status,
        body: summarize_body(&body),
        retry_after,
        url,
    }
}

/// The registry's error body: the `errors[].code: message` of the distribution spec when it
/// is that, else the text itself, shortened.
fn summarize_body(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Envelope {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    if let Ok(env) = serde_json::from_slice::<Envelope>(body) {
        return env
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.code, e.message))
            .collect::<Vec<_>>()
            .join("; ");
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let mut short: String = text.chars().take(300).collect();
    if short.len() < text.len() {
        short.push_str("...");
    }
    short.replace('\n', " ")
}

/// `Retry-After` as seconds or as an HTTP date.
pub(crate) fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = parse_http_date(v)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some(Duration::from_secs(when.saturating_sub(now)))
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` as seconds since the epoch.
fn parse_http_date(s: &str) -> Option<u64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    if parts.len() != 6 {
        return None;
    }
    let day: u64 = parts[1].parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[2])? as u64
        + 1;
    let year: i64 = parts[3].parse().ok()?;
    let hms: Vec<u64> = parts[4]
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if hms.len() != 3 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m as i64 + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let secs = days * 86400 + (hms[0] * 3600 + hms[1] * 60 + hms[2]) as i64;
    u64::try_from(secs).ok()
}

/// Runs `op` until it succeeds, fails for good, or `policy.attempts` are used up (see
/// [`pause_before_retry`]). Returns the last error and the number of attempts made.
pub(crate) async fn retry<T, F, Fut>(
    policy: &RetryPolicy,
    what: &str,
    mut op: F,
) -> Result<T, (HttpError, u32)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, HttpError>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                if !pause_before_retry(policy, what, attempt, &e).await {
                    return Err((e, attempt));
                }
            }
        }
    }
}

/// After attempt number `attempt` failed with `err`: whether to try again, having waited
/// with exponential backoff and jitter, or what `Retry-After` asks (capped by the policy).
pub(crate) async fn pause_before_retry(
    policy: &RetryPolicy,
    what: &str,
    attempt: u32,
    err: &HttpError,
) -> bool {
    if attempt >= policy.attempts || !err.is_transient() {
        return false;
    }
    let delay = match err.retry_after() {
        Some(d) => d.min(policy.max_retry_after),
        None => backoff(policy, attempt),
    };
    tracing::warn!(
        "{what}: {} (attempt {attempt} of {}), retrying in {} ms",
        err.detail(),
        policy.attempts,
        delay.as_millis()
    );
    tokio::time::sleep(delay).await;
    true
}

/// Exponential backoff with "equal jitter": half fixed, half random, so that many clients
/// that failed together do not come back together.
fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let exp = policy
        .initial_delay
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let base = exp.min(policy.max_delay);
    let half = base / 2;
    let jitter = half.mul_f64(random_unit());
    half + jitter
}

/// A number in [0, 1) that differs between calls and processes; not cryptographic.
fn random_unit() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ (u64::from(std::process::id()) << 32);
    let mut x = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed) ^ seed;
    // splitmix64
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_and_as_a_date() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784111777)
        );
        h.insert(
            RETRY_AFTER,
            "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap(),
        );
        assert_eq!(parse_retry_after(&h), Some(Duration::ZERO));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            attempts: 10,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(5),
        };
        let d1 = backoff(&p, 1);
        assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
        let d9 = backoff(&p, 9);
        assert!(d9 >= Duration::from_millis(500) && d9 <= Duration::from_secs(1));
    }

    #[test]
    fn error_bodies_are_summarized() {
        let body = br#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#;
        assert_eq!(
            summarize_body(body),
            "DENIED: requested access to the resource is denied"
        );
        assert_eq!(summarize_body(b"oops\n"), "oops");
    }

    #[test]
    fn queries_are_encoded() {
        assert_eq!(
            with_query(
                "http://h/token",
                &[("scope", "repository:a/b:pull,push".into())]
            ),
            "http://h/token?scope=repository%3Aa%2Fb%3Apull%2Cpush"
        );
        assert_eq!(
            with_query("http://h/u?_state=x", &[("digest", "sha256:ab".into())]),
            "http://h/u?_state=x&digest=sha256%3Aab"
        );
    }
}
