//! Who may use the `--http` server.
//!
//! The `--http-config` file (YAML; `[http] config` in the configuration file) takes the
//! keys of Prometheus' web configuration file, `tls_server_config` (`cert_file`,
//! `key_file`) and `basic_auth_users` (user: bcrypt hash), and three of the agent's own:
//! `bearer_tokens` (hashes: `sha256:` and 64 hex digits, or bcrypt), `bearer_tokens_file`
//! (one such hash a line) and `metrics_open` (GET /metrics without credentials). Paths
//! are relative to the file's directory. [`WebConfig::load`] checks everything at start
//! (and in `detector check-config`): each error names the key and the fix. The
//! certificate and key are read again when their files change (a renewal).
//!
//! [`guard`] runs before routing, on every request:
//! - without authentication configured, the page and the API answer only to a Host
//!   header that is an IP address or `localhost` (a web page cannot reach them through a
//!   DNS name rebound to this host); 403;
//! - a write (any method but GET and HEAD) is refused when its `Origin` is not this
//!   server's own or its `Sec-Fetch-Site` is neither `same-origin` nor `none`; with
//!   neither header (not a browser of the last years) it is refused only with a content
//!   type an HTML form can send (`application/x-www-form-urlencoded`,
//!   `multipart/form-data`, `text/plain`); 403, whatever the credentials;
//! - with authentication configured, every request needs a user's password (HTTP basic
//!   authentication) or a bearer token, but GET/HEAD of /metrics with `metrics_open`;
//!   401 with `WWW-Authenticate`.
//!
//! Each refusal is counted (`detector_http_refused_total{reason}`) and logged, one line
//! per reason a minute at most. bcrypt runs on a thread of its own (one hash at a time,
//! without capabilities); credentials that passed are remembered by their SHA-256, so a
//! page refreshing every 2 s costs one bcrypt verification, not one a request.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_yaml_ng::Value;
use sha2::{Digest, Sha256};

use super::Status;

/// `--http` and `[http] listen`: `PORT` or `:PORT` (on 127.0.0.1), `localhost:PORT`, or
/// `ADDR:PORT`.
pub fn parse_http_listen(s: &str) -> Result<SocketAddr, String> {
    let bad = || {
        format!(
            "'{s}' is not PORT, :PORT or ADDR:PORT; e.g. 9750 or :9750 (127.0.0.1:9750), 0.0.0.0:9750, [::1]:9750"
        )
    };
    let t = s.trim();
    let port = t
        .strip_prefix(':')
        .or_else(|| t.strip_prefix("localhost:"))
        .unwrap_or(t);
    if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
        let port: u16 = port.parse().map_err(|_| bad())?;
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    t.parse().map_err(|_| bad())
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct WebConfigError {
    pub path: String,
    pub message: String,
}

/// The keys of the file.
const KEYS: [&str; 5] = [
    "tls_server_config",
    "basic_auth_users",
    "bearer_tokens",
    "bearer_tokens_file",
    "metrics_open",
];
const TLS_KEYS: [&str; 2] = ["cert_file", "key_file"];

const NO_CLIENT_CERTS: &str = "client certificates are not supported: remove the key and authenticate clients with basic_auth_users or bearer_tokens";
const SAFE_DEFAULTS: &str =
    "the agent offers TLS 1.2 and 1.3 with rustls' safe defaults only: remove the key";

/// Keys of Prometheus' web configuration file the agent does not implement, and the fix.
const UNSUPPORTED: [(&str, &str); 11] = [
    (
        "http_server_config",
        "HTTP/2 and extra response headers are not configurable here: remove the section",
    ),
    ("tls_server_config.client_ca_file", NO_CLIENT_CERTS),
    ("tls_server_config.client_auth_type", NO_CLIENT_CERTS),
    ("tls_server_config.client_allowed_sans", NO_CLIENT_CERTS),
    ("tls_server_config.min_version", SAFE_DEFAULTS),
    ("tls_server_config.max_version", SAFE_DEFAULTS),
    ("tls_server_config.cipher_suites", SAFE_DEFAULTS),
    ("tls_server_config.curve_preferences", SAFE_DEFAULTS),
    (
        "tls_server_config.prefer_server_cipher_suites",
        SAFE_DEFAULTS,
    ),
    (
        "tls_server_config.cert",
        "give the certificate as a file with cert_file",
    ),
    (
        "tls_server_config.key",
        "give the key as a file with key_file",
    ),
];

/// A bearer token's hash.
#[derive(Clone, Debug, PartialEq)]
enum TokenHash {
    Sha256([u8; 32]),
    Bcrypt(String),
}

const TOKEN_FIX: &str = "give `sha256:` and the 64 hex digits of `printf %s TOKEN | sha256sum`, or a bcrypt hash (`htpasswd -nbBC 10 '' TOKEN | tr -d ':\\n'`)";
const USER_FIX: &str = "give the bcrypt hash of the password, e.g. from `htpasswd -nBC 10 USER` (the part after the colon)";

impl TokenHash {
    fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(hex) = s.strip_prefix("sha256:") {
            let bytes = decode_hex(hex).ok_or_else(|| {
                format!("`sha256:` is not followed by 64 hex digits; {TOKEN_FIX}")
            })?;
            return Ok(Self::Sha256(bytes));
        }
        if s.starts_with("$2") {
            check_bcrypt(s).map_err(|e| format!("{e}; {TOKEN_FIX}"))?;
            return Ok(Self::Bcrypt(s.to_string()));
        }
        Err(format!(
            "not a token hash (a token itself is never written here); {TOKEN_FIX}"
        ))
    }
}

fn decode_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn check_bcrypt(hash: &str) -> Result<(), String> {
    let parts: bcrypt::HashParts = hash
        .parse()
        .map_err(|e| format!("not a bcrypt hash ({e})"))?;
    if !(4..=31).contains(&parts.get_cost()) {
        return Err(format!(
            "a bcrypt cost of {} is out of range",
            parts.get_cost()
        ));
    }
    Ok(())
}

/// The `--http-config` file, loaded and checked.
#[derive(Clone, Default)]
pub struct WebConfig {
    /// The file, if any.
    pub path: Option<PathBuf>,
    /// TLS, with the files it came from.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub tls_files: Option<(PathBuf, PathBuf)>,
    users: BTreeMap<String, String>,
    tokens: Vec<TokenHash>,
    metrics_open: bool,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("path", &self.path)
            .field("tls_files", &self.tls_files)
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .field("tokens", &self.tokens.len())
            .field("metrics_open", &self.metrics_open)
            .finish()
    }
}

impl WebConfig {
    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        let p = path.display().to_string();
        let err = |message: String| WebConfigError {
            path: p.clone(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            err(format!(
                "cannot read it: {e} (give --http-config or [http] config the path of a YAML file)"
            ))
        })?;
        let value: Value =
            serde_yaml_ng::from_str(&text).map_err(|e| err(format!("not YAML: {e}")))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::from_value(&value, dir)
            .map(|mut c| {
                c.path = Some(path.to_path_buf());
                c
            })
            .map_err(err)
    }

    fn from_value(value: &Value, dir: &Path) -> Result<Self, String> {
        let empty = serde_yaml_ng::Mapping::new();
        let map = match value {
            Value::Null => &empty,
            Value::Mapping(m) => m,
            _ => {
                return Err(format!(
                    "the file is not a mapping of keys; the keys are {}",
                    KEYS.join(", ")
                ));
            }
        };
        check_keys(map, "", &KEYS)?;
        let mut c = WebConfig::default();
        let resolve = |p: &str| {
            let p = Path::new(p);
            if p.is_relative() {
                dir.join(p)
            } else {
                p.to_path_buf()
            }
        };
        if let Some(v) = map.get("tls_server_config") {
            let Value::Mapping(t) = v else {
                return Err("`tls_server_config` must hold cert_file and key_file".into());
            };
            check_keys(t, "tls_server_config.", &TLS_KEYS)?;
            let file = |key: &str| -> Result<PathBuf, String> {
                match t.get(key) {
                    Some(Value::String(s)) if !s.is_empty() => Ok(resolve(s)),
                    _ => Err(format!(
                        "`tls_server_config.{key}` is missing: give the path of the PEM {}",
                        if key == "cert_file" {
                            "certificate (chain) the server presents"
                        } else {
                            "private key of the certificate"
                        }
                    )),
                }
            };
            let (cert, key) = (file("cert_file")?, file("key_file")?);
            c.tls = Some(Arc::new(server_config(&cert, &key)?));
            c.tls_files = Some((cert, key));
        }
        if let Some(v) = map.get("basic_auth_users") {
            let users: BTreeMap<String, String> = match v {
                Value::Null => BTreeMap::new(),
                v => serde_yaml_ng::from_value(v.clone()).map_err(|e| {
                    format!("`basic_auth_users` must map user names to bcrypt hashes: {e}")
                })?,
            };
            for (user, hash) in &users {
                if user.is_empty() || user.contains(':') {
                    return Err(format!(
                        "`basic_auth_users`: '{user}' cannot be a user name (empty, or with a colon, which HTTP basic authentication cannot carry): rename it"
                    ));
                }
                check_bcrypt(hash)
                    .map_err(|e| format!("`basic_auth_users.{user}`: {e}; {USER_FIX}"))?;
            }
            c.users = users;
        }
        if let Some(v) = map.get("bearer_tokens") {
            let list: Vec<String> = match v {
                Value::Null => Vec::new(),
                v => serde_yaml_ng::from_value(v.clone())
                    .map_err(|e| format!("`bearer_tokens` must be a list of token hashes: {e}"))?,
            };
            for (i, s) in list.iter().enumerate() {
                c.tokens
                    .push(TokenHash::parse(s).map_err(|e| format!("`bearer_tokens[{i}]`: {e}"))?);
            }
        }
        if let Some(v) = map.get("bearer_tokens_file") {
            let Value::String(f) = v else {
                return Err("`bearer_tokens_file` must be the path of a file".into());
            };
            let f = resolve(f);
            let text = std::fs::read_to_string(&f).map_err(|e| {
                format!(
                    "`bearer_tokens_file`: cannot read {}: {e} (a file of token hashes, one a line)",
                    f.display()
                )
            })?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                c.tokens.push(TokenHash::parse(line).map_err(|e| {
                    format!("`bearer_tokens_file`: {}:{}: {e}", f.display(), n + 1)
                })?);
            }
        }
        if let Some(v) = map.get("metrics_open") {
            let Value::Bool(b) = v else {
                return Err("`metrics_open` must be true or false".into());
            };
            c.metrics_open = *b;
        }
        Ok(c)
    }

    /// Whether requests need credentials.
    pub fn authenticates(&self) -> bool {
        !self.users.is_empty() || !self.tokens.is_empty()
    }

    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// What the file sets, for `check-config` and the log.
    pub fn describe(&self) -> String {
        let mut out = Vec::new();
        match &self.tls_files {
            Some((cert, key)) => out.push(format!(
                "tls: certificate {}, key {}",
                cert.display(),
                key.display()
            )),
            None => out.push("tls: off (plain HTTP)".to_string()),
        }
        if self.authenticates() {
            let mut who = Vec::new();
            if !self.users.is_empty() {
                let users: Vec<&str> = self.users.keys().map(String::as_str).collect();
                who.push(format!("basic for {}", users.join(", ")));
            }
            if !self.tokens.is_empty() {
                who.push(format!("{} bearer token(s)", self.tokens.len()));
            }
            out.push(format!(
                "authentication: {}; /metrics {}",
                who.join(", "),
                if self.metrics_open {
                    "open (metrics_open)"
                } else {
                    "authenticated too"
                }
            ));
        } else {
            out.push(
                "authentication: none (the page and the API answer to IP addresses and localhost only)"
                    .to_string(),
            );
        }
        out.push(
            "writes: refused from other sites (Origin, Sec-Fetch-Site), and with a form's content type without either header"
                .to_string(),
        );
        out.join("\n") + "\n"
    }
}

fn check_keys(map: &serde_yaml_ng::Mapping, prefix: &str, known: &[&str]) -> Result<(), String> {
    for k in map.keys() {
        let Some(k) = k.as_str() else {
            return Err(format!("a key of {prefix}... is not a string"));
        };
        if known.contains(&k) {
            continue;
        }
        let full = format!("{prefix}{k}");
        if let Some((_, fix)) = UNSUPPORTED.iter().find(|(u, _)| *u == full) {
            return Err(format!(
                "`{full}` (a key of Prometheus' web configuration) is not supported: {fix}"
            ));
        }
        return Err(format!(
            "unknown key `{full}`: the keys{} are {}",
            if prefix.is_empty() {
                String::new()
            } else {
                format!(" of {}", prefix.trim_end_matches('.'))
            },
            known.join(", ")
        ));
    }
    Ok(())
}

/// The TLS server configuration of a PEM certificate chain and its key, read again when
/// either file changes (see [`Reloading`]).
fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified = certified_key(cert, key, &provider)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Reloading {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            provider,
            state: Mutex::new(ReloadState {
                certified: Arc::new(certified),
                stamps: stamps(cert, key),
                checked: Instant::now(),
            }),
        }));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The certificate chain of `cert` with the private key of `key`, checked to go together.
fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<rustls::sign::CertifiedKey, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |key_name: &str, p: &Path| {
        std::fs::read(p).map_err(|e| {
            format!(
                "`tls_server_config.{key_name}`: cannot read {}: {e} (give the path of a PEM file, absolute or relative to this file's directory)",
                p.display()
            )
        })
    };
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read("cert_file", cert)?)
            .collect::<Result<_, _>>()
            .map_err(|e| {
                format!(
                    "`tls_server_config.cert_file`: {} is not a PEM certificate chain: {e}",
                    cert.display()
                )
            })?;
    if certs.is_empty() {
        return Err(format!(
            "`tls_server_config.cert_file`: {} holds no certificate (-----BEGIN CERTIFICATE-----); was it swapped with key_file?",
            cert.display()
        ));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read("key_file", key)?).map_err(|e| {
        format!(
            "`tls_server_config.key_file`: {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1; {e}); was it swapped with cert_file, or is it encrypted? (the key must not need a passphrase)",
            key.display()
        )
    })?;
    rustls::sign::CertifiedKey::from_der(certs, key_der, provider).map_err(|e| {
        format!(
            "`tls_server_config`: the key {} and the certificate {} do not go together ({e}): key_file must be the private key of cert_file's first certificate",
            key.display(),
            cert.display()
        )
    })
}

/// The certificate files are looked at, at a handshake, at most this often.
const RELOAD_CHECK: Duration = Duration::from_secs(5);

/// The modification times of the certificate and the key.
fn stamps(cert: &Path, key: &Path) -> [Option<std::time::SystemTime>; 2] {
    [cert, key].map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// Serves the certificate and key, and reads them again when either file changed (a
/// renewed certificate needs no restart); a pair that does not load is logged and the
/// one before kept.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    state: Mutex<ReloadState>,
}

#[derive(Debug)]
struct ReloadState {
    certified: Arc<rustls::sign::CertifiedKey>,
    stamps: [Option<std::time::SystemTime>; 2],
    checked: Instant,
}

impl rustls::server::ResolvesServerCert for Reloading {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.checked.elapsed() >= RELOAD_CHECK {
            st.checked = Instant::now();
            let now = stamps(&self.cert, &self.key);
            if now != st.stamps {
                st.stamps = now;
                match certified_key(&self.cert, &self.key, &self.provider) {
                    Ok(c) => {
                        log::info!(
                            "--http: certificate {} and key {} read again (changed)",
                            self.cert.display(),
                            self.key.display()
                        );
                        st.certified = Arc::new(c);
                    }
                    Err(e) => log::warn!(
                        "--http: the changed certificate or key does not load, the previous is served: {e}"
                    ),
                }
            }
        }
        Some(st.certified.clone())
    }
}

/// Why a request or connection was refused: the `reason` label of
/// `detector_http_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No credentials.
    Unauthenticated,
    /// Wrong credentials.
    BadCredentials,
    /// A write from another site.
    CrossSite,
    /// Without authentication, a Host header that is a name other than localhost.
    Host,
    /// Plain HTTP on the TLS port.
    PlainHttp,
    /// A TLS handshake that failed or did not finish in time.
    TlsHandshake,
}

pub const REASONS: [&str; 6] = [
    "unauthenticated",
    "bad_credentials",
    "cross_site",
    "host",
    "plain_http",
    "tls_handshake",
];

impl Reason {
    pub fn label(self) -> &'static str {
        REASONS[self as usize]
    }
}

/// A refusal is logged at most once a minute by reason; the lines in between are
/// counted into the next.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Counts refusals into the status snapshot and logs them, rate-limited.
pub struct Refusals {
    status: Arc<Status>,
    log: Mutex<[(Option<Instant>, u64); REASONS.len()]>,
}

impl Refusals {
    pub fn new(status: Arc<Status>) -> Self {
        Self {
            status,
            log: Mutex::new([(None, 0); REASONS.len()]),
        }
    }

    pub fn refuse(&self, reason: Reason, what: impl FnOnce() -> String) {
        let i = reason as usize;
        self.status.update(|s| s.http_refused[i] += 1);
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let (last, quiet) = &mut log[i];
        let now = Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
            let more = match *quiet {
                0 => String::new(),
                n => format!(
                    " ({n} more refused for {} since the last line)",
                    reason.label()
                ),
            };
            log::warn!("--http: refused {} ({}){more}", what(), reason.label());
            *last = Some(now);
            *quiet = 0;
        } else {
            *quiet += 1;
        }
    }
}

/// A bcrypt verification for the verifier thread: the secret, the hash (none: a dummy,
/// so that an unknown user takes as long as a known one), where to answer.
struct Job {
    secret: Vec<u8>,
    hash: Option<String>,
    reply: tokio::sync::oneshot::Sender<bool>,
}

/// Credentials remembered at most (then forgotten all at once).
const REMEMBERED: usize = 1024;

/// The guard's state: what the file configured and the refusal counters.
pub struct Guard {
    users: BTreeMap<String, String>,
    tokens: Vec<TokenHash>,
    metrics_open: bool,
    scheme: &'static str,
    /// SHA-256 of the `Authorization` values that passed.
    passed: Mutex<HashSet<[u8; 32]>>,
    verifier: Option<Mutex<std::sync::mpsc::Sender<Job>>>,
    pub refusals: Arc<Refusals>,
}

impl Guard {
    /// The guard of `web`; starts the bcrypt thread if any hash is bcrypt.
    pub fn new(web: &WebConfig, refusals: Arc<Refusals>) -> Self {
        let bcrypt_hashes =
            !web.users.is_empty() || web.tokens.iter().any(|t| matches!(t, TokenHash::Bcrypt(_)));
        let verifier = bcrypt_hashes.then(|| {
            let cost = web
                .users
                .values()
                .next()
                .and_then(|h| h.parse::<bcrypt::HashParts>().ok())
                .map_or(bcrypt::DEFAULT_COST, |p| p.get_cost());
            Mutex::new(start_verifier(cost))
        });
        Self {
            users: web.users.clone(),
            tokens: web.tokens.clone(),
            metrics_open: web.metrics_open,
            scheme: web.scheme(),
            passed: Mutex::new(HashSet::new()),
            verifier,
            refusals,
        }
    }

    fn authenticates(&self) -> bool {
        !self.users.is_empty() || !self.tokens.is_empty()
    }

    async fn bcrypt(&self, secret: &[u8], hash: Option<&str>) -> bool {
        let Some(v) = &self.verifier else {
            return false;
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            secret: secret.to_vec(),
            hash: hash.map(str::to_string),
            reply,
        };
        if v.lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .is_err()
        {
            return false;
        }
        answer.await.unwrap_or(false)
    }

    /// Checks the `Authorization` header; the refusal's reason and what to log.
    async fn authenticate(&self, headers: &HeaderMap) -> Result<(), (Reason, String)> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err((Reason::Unauthenticated, "no credentials".into()));
        };
        let digest: [u8; 32] = Sha256::digest(value.as_bytes()).into();
        if self
            .passed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&digest)
        {
            return Ok(());
        }
        let (scheme, rest) = value
            .to_str()
            .ok()
            .and_then(|v| v.trim().split_once(' '))
            .unwrap_or(("", ""));
        let rest = rest.trim();
        let (ok, who) = if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .unwrap_or_default();
            match decoded
                .iter()
                .position(|&b| b == b':')
                .map(|i| (&decoded[..i], &decoded[i + 1..]))
            {
                Some((user, password)) => {
                    let user = String::from_utf8_lossy(user).into_owned();
                    match self.users.get(&user) {
                        Some(hash) => (
                            self.bcrypt(password, Some(hash)).await,
                            format!("user '{user}'"),
                        ),
                        None => {
                            self.bcrypt(password, None).await;
                            (false, format!("unknown user '{user}'"))
                        }
                    }
                }
                None => (false, "malformed basic credentials".to_string()),
            }
        } else if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
            let token: [u8; 32] = Sha256::digest(rest.as_bytes()).into();
            let mut ok = false;
            for t in &self.tokens {
                ok = match t {
                    TokenHash::Sha256(h) => equal(h, &token),
                    TokenHash::Bcrypt(h) => self.bcrypt(rest.as_bytes(), Some(h)).await,
                };
                if ok {
                    break;
                }
            }
            (ok, "a bearer token".to_string())
        } else {
            (false, "an unsupported Authorization scheme".to_string())
        };
        if !ok {
            return Err((Reason::BadCredentials, format!("wrong credentials ({who})")));
        }
        let mut passed = self.passed.lock().unwrap_or_else(|p| p.into_inner());
        if passed.len() >= REMEMBERED {
            passed.clear();
        }
        passed.insert(digest);
        Ok(())
    }

    /// Whether `req` may go on to the routes; the refusal otherwise.
    async fn check(&self, req: &axum::http::request::Parts) -> Result<(), Refusal> {
        let headers = &req.headers;
        let write = !matches!(req.method, Method::GET | Method::HEAD);
        let metrics = !write && req.uri.path() == "/metrics";
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri.authority().map(|a| a.as_str()));
        if !self.authenticates()
            && !metrics
            && let Some(h) = host
            && !host_is_local(h)
        {
            return Err(Refusal::forbidden(
                Reason::Host,
                format!("Host '{h}' without authentication"),
                "This server answers names other than localhost only with authentication \
                 configured (--http-config): use its IP address, or configure basic_auth_users \
                 or bearer_tokens.\n",
            ));
        }
        if write {
            self.same_origin(headers, host)?;
        }
        if self.authenticates() && !(metrics && self.metrics_open) {
            self.authenticate(headers)
                .await
                .map_err(|(reason, log)| Refusal {
                    status: StatusCode::UNAUTHORIZED,
                    reason,
                    log,
                    body: match reason {
                        Reason::Unauthenticated => {
                            "Authentication required: a user's password (basic) or a bearer token.\n"
                        }
                        _ => "Wrong credentials.\n",
                    },
                })?;
        }
        Ok(())
    }

    /// A write from another site is refused (see the module's documentation).
    fn same_origin(&self, headers: &HeaderMap, host: Option<&str>) -> Result<(), Refusal> {
        let cross = |log: String| {
            Refusal::forbidden(
                Reason::CrossSite,
                log,
                "Cross-site write refused: writes are accepted from this server's own page, \
                 or from clients that send neither Origin nor Sec-Fetch-Site and no form \
                 content type.\n",
            )
        };
        let fetch_site = headers
            .get("sec-fetch-site")
            .map(|v| v.to_str().unwrap_or("?"));
        if let Some(site) = fetch_site
            && !matches!(site, "same-origin" | "none")
        {
            return Err(cross(format!("a write with Sec-Fetch-Site: {site}")));
        }
        let origin = headers
            .get(header::ORIGIN)
            .map(|v| v.to_str().unwrap_or("?"));
        if let Some(origin) = origin {
            let own = host.map(|h| format!("{}://{h}", self.scheme));
            if own.is_none_or(|own| !own.eq_ignore_ascii_case(origin)) {
                return Err(cross(format!(
                    "a write from Origin {origin} (this server is {}://{})",
                    self.scheme,
                    host.unwrap_or("?")
                )));
            }
        }
        if fetch_site.is_none() && origin.is_none() {
            let media = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| {
                    v.split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_ascii_lowercase()
                });
            if let Some(m) = media
                && matches!(
                    m.as_str(),
                    "application/x-www-form-urlencoded" | "multipart/form-data" | "text/plain"
                )
            {
                return Err(cross(format!(
                    "a write with Content-Type {m} and neither Origin nor Sec-Fetch-Site (as a form of another site would send it)"
                )));
            }
        }
        Ok(())
    }

    fn challenge(&self) -> Vec<HeaderValue> {
        let mut v = Vec::new();
        if !self.users.is_empty() {
            v.push(HeaderValue::from_static(
                "Basic realm=\"detector\", charset=\"UTF-8\"",
            ));
        }
        if !self.tokens.is_empty() {
            v.push(HeaderValue::from_static("Bearer realm=\"detector\""));
        }
        v
    }
}

/// Constant-time equality of two digests.
fn equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a Host header names this host: an IP address or localhost, with any port.
fn host_is_local(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        },
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok()
}

struct Refusal {
    status: StatusCode,
    reason: Reason,
    log: String,
    body: &'static str,
}

impl Refusal {
    fn forbidden(reason: Reason, log: String, body: &'static str) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            reason,
            log,
            body,
        }
    }
}

/// The bcrypt thread: one verification at a time, no capabilities.
fn start_verifier(cost: u32) -> std::sync::mpsc::Sender<Job> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("http-auth".into())
        .spawn(move || {
            crate::privileges::drop_thread_capabilities();
            let mut dummy: Option<String> = None;
            for job in rx {
                let ok = match &job.hash {
                    Some(h) => bcrypt::verify(&job.secret, h).unwrap_or(false),
                    None => {
                        let d = dummy.get_or_insert_with(|| {
                            bcrypt::hash("not a password", cost).unwrap_or_default()
                        });
                        let _ = bcrypt::verify(&job.secret, d);
                        false
                    }
                };
                let _ = job.reply.send(ok);
            }
        })
        .expect("spawn the http-auth thread");
    tx
}

/// The middleware every request passes before routing (`Router::layer` in
/// [`super::server`]).
pub async fn guard(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    // The body is not Sync: the check borrows the head only.
    let (parts, body) = req.into_parts();
    match g.check(&parts).await {
        Ok(()) => next.run(Request::from_parts(parts, body)).await,
        Err(r) => {
            let peer = parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map_or("?".to_string(), |c| c.0.to_string());
            g.refusals.refuse(r.reason, || {
                format!(
                    "{} {} from {peer}: {}",
                    parts.method,
                    parts.uri.path(),
                    r.log
                )
            });
            let mut resp = (
                r.status,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                r.body,
            )
                .into_response();
            if r.status == StatusCode::UNAUTHORIZED {
                for v in g.challenge() {
                    resp.headers_mut().append(header::WWW_AUTHENTICATE, v);
                }
            }
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_yaml(text: &str) -> Result<WebConfig, String> {
        let v: Value = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        WebConfig::from_value(&v, Path::new("/nonexistent"))
    }

    #[test]
    fn http_listen_defaults_to_loopback() {
        let lo = |p| SocketAddr::from(([127, 0, 0, 1], p));
        assert_eq!(parse_http_listen("9750"), Ok(lo(9750)));
        assert_eq!(parse_http_listen(":9750"), Ok(lo(9750)));
        assert_eq!(parse_http_listen("localhost:9750"), Ok(lo(9750)));
        assert_eq!(
            parse_http_listen("0.0.0.0:9750"),
            Ok("0.0.0.0:9750".parse().unwrap())
        );
        assert_eq!(
            parse_http_listen("[::1]:9750"),
            Ok("[::1]:9750".parse().unwrap())
        );
        for bad in ["", ":", "99999", "host:9750", "127.0.0.1"] {
            let e = parse_http_listen(bad).unwrap_err();
            assert!(e.contains(":PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn hashes_are_checked_and_errors_name_the_key_and_the_fix() {
        let hash = bcrypt::hash("secret", 4).unwrap();
        let token = format!("sha256:{}", "ab".repeat(32));
        let c = from_yaml(&format!(
            "basic_auth_users:\n  alice: '{hash}'\nbearer_tokens: ['{token}']\nmetrics_open: true\n"
        ))
        .unwrap();
        assert!(c.authenticates() && c.metrics_open && c.tls.is_none());
        assert_eq!(c.tokens, vec![TokenHash::Sha256([0xab; 32])]);
        assert!(from_yaml("").unwrap().describe().contains("none"));

        let e = from_yaml("basic_auth_users:\n  alice: secret\n").unwrap_err();
        assert!(
            e.contains("basic_auth_users.alice") && e.contains("htpasswd"),
            "{e}"
        );
        let e = from_yaml("bearer_tokens: [my-token]\n").unwrap_err();
        assert!(
            e.contains("bearer_tokens[0]") && e.contains("sha256sum"),
            "{e}"
        );
        let e = from_yaml("bearer_tokens: ['sha256:abc']\n").unwrap_err();
        assert!(e.contains("64 hex digits"), "{e}");
        let e = from_yaml("basic_auth_user:\n  alice: x\n").unwrap_err();
        assert!(
            e.contains("unknown key `basic_auth_user`") && e.contains("basic_auth_users"),
            "{e}"
        );
        let e = from_yaml("tls_server_config:\n  client_auth_type: RequireAndVerifyClientCert\n")
            .unwrap_err();
        assert!(
            e.contains("tls_server_config.client_auth_type") && e.contains("not supported"),
            "{e}"
        );
        let e = from_yaml("tls_server_config:\n  cert_file: c.pem\n").unwrap_err();
        assert!(e.contains("tls_server_config.key_file` is missing"), "{e}");
        let e =
            from_yaml("tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n").unwrap_err();
        assert!(
            e.contains("tls_server_config.cert_file") && e.contains("/nonexistent/c.pem"),
            "{e}"
        );
        let e = from_yaml("metrics_open: yes please\n").unwrap_err();
        assert!(e.contains("metrics_open"), "{e}");
    }

    #[test]
    fn only_ip_addresses_and_localhost_are_local_hosts() {
        for h in [
            "127.0.0.1:9750",
            "localhost:9750",
            "LOCALHOST",
            "[::1]:9750",
            "10.0.0.1",
        ] {
            assert!(host_is_local(h), "{h}");
        }
        for h in ["evil.example:9750", "evil.example", "127.0.0.1.nip.io:80"] {
            assert!(!host_is_local(h), "{h}");
        }
    }

    fn guard(web: &WebConfig) -> Guard {
        Guard::new(
            web,
            Arc::new(Refusals::new(Arc::new(Status::new(
                std::time::SystemTime::now(),
            )))),
        )
    }

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(axum::body::Body::empty()).unwrap()
    }

    fn verdict(g: &Guard, req: Request) -> Result<(), (u16, &'static str)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (parts, _) = req.into_parts();
        rt.block_on(g.check(&parts))
            .map_err(|r| (r.status.as_u16(), r.reason.label()))
    }

    #[test]
    fn writes_from_other_sites_are_refused_without_authentication_too() {
        let g = guard(&WebConfig::default());
        let host = ("host", "127.0.0.1:9750");
        assert_eq!(verdict(&g, request("GET", "/api/alarms", &[host])), Ok(()));
        assert_eq!(verdict(&g, request("POST", "/api/x", &[host])), Ok(()));
        assert_eq!(
            verdict(
                &g,
                request(
                    "POST",
                    "/api/x",
                    &[host, ("origin", "http://127.0.0.1:9750")]
                )
            ),
            Ok(())
        );
        let cross = Err((403, "cross_site"));
        assert_eq!(
            verdict(
                &g,
                request("POST", "/api/x", &[host, ("origin", "http://evil.example")])
            ),
            cross
        );
        assert_eq!(
            verdict(
                &g,
                request(
                    "POST",
                    "/api/x",
                    &[host, ("origin", "https://127.0.0.1:9750")]
                )
            ),
            cross,
            "another scheme is another origin"
        );
        assert_eq!(
            verdict(
                &g,
                request(
                    "DELETE",
                    "/api/x",
                    &[host, ("sec-fetch-site", "cross-site")]
                )
            ),
            cross
        );
        assert_eq!(
            verdict(
                &g,
                request(
                    "POST",
                    "/api/x",
                    &[host, ("content-type", "application/x-www-form-urlencoded")]
                )
            ),
            cross
        );
        assert_eq!(
            verdict(
                &g,
                request(
                    "POST",
                    "/api/x",
                    &[host, ("content-type", "application/json")]
                )
            ),
            Ok(())
        );
        // DNS rebinding: a name, without authentication.
        let evil = ("host", "evil.example:9750");
        assert_eq!(
            verdict(&g, request("GET", "/api/alarms", &[evil])),
            Err((403, "host"))
        );
        assert_eq!(verdict(&g, request("GET", "/metrics", &[evil])), Ok(()));
    }

    #[test]
    fn credentials_are_checked_for_reads_and_writes() {
        let token = "s3cret-token";
        let hex: String = Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let web = from_yaml(&format!(
            "basic_auth_users:\n  alice: '{}'\nbearer_tokens: ['sha256:{hex}', '{}']\n",
            bcrypt::hash("wonderland", 4).unwrap(),
            bcrypt::hash("other-token", 4).unwrap()
        ))
        .unwrap();
        let g = guard(&web);
        let host = ("host", "evil.example");
        let basic = |u: &str, p: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        };
        let good = basic("alice", "wonderland");
        for (method, path) in [("GET", "/api/alarms"), ("GET", "/metrics"), ("POST", "/x")] {
            assert_eq!(
                verdict(&g, request(method, path, &[host])),
                Err((401, "unauthenticated"))
            );
            for wrong in [
                basic("alice", "wrong"),
                basic("bob", "wonderland"),
                "Bearer nope".into(),
                "Digest x".into(),
            ] {
                assert_eq!(
                    verdict(
                        &g,
                        request(method, path, &[host, ("authorization", &wrong)])
                    ),
                    Err((401, "bad_credentials")),
                    "{wrong}"
                );
            }
            for right in [
                good.clone(),
                format!("Bearer {token}"),
                "Bearer other-token".into(),
            ] {
                assert_eq!(
                    verdict(
                        &g,
                        request(method, path, &[host, ("authorization", &right)])
                    ),
                    Ok(()),
                    "{right}"
                );
            }
        }
        assert_eq!(
            verdict(
                &g,
                request(
                    "POST",
                    "/x",
                    &[
                        host,
                        ("authorization", &good),
                        ("origin", "http://evil.example:1")
                    ]
                )
            ),
            Err((403, "cross_site"))
        );
    }

    #[test]
    fn metrics_open_spares_only_reads_of_metrics() {
        let users = format!(
            "basic_auth_users:\n  alice: '{}'\n",
            bcrypt::hash("wonderland", 4).unwrap()
        );
        let host = ("host", "127.0.0.1:9750");
        let json = ("content-type", "application/json");
        let refused = Err((401, "unauthenticated"));
        for open in [true, false] {
            let g = guard(&from_yaml(&format!("{users}metrics_open: {open}\n")).unwrap());
            let scrape = if open { Ok(()) } else { refused };
            assert_eq!(
                verdict(&g, request("GET", "/metrics", &[host])),
                scrape,
                "metrics_open: {open}"
            );
            assert_eq!(verdict(&g, request("HEAD", "/metrics", &[host])), scrape);
            // Not a path that starts like it, nor the API, nor any write.
            for (method, path) in [
                ("GET", "/metrics/x"),
                ("GET", "/api/alarms"),
                ("GET", "/"),
                ("POST", "/metrics"),
                ("POST", "/api/alarms/0123456789abcdef/ack"),
                ("POST", "/api/suppressions"),
                ("DELETE", "/api/suppressions/s1"),
            ] {
                assert_eq!(
                    verdict(&g, request(method, path, &[host, json])),
                    refused,
                    "{method} {path} with metrics_open: {open}"
                );
            }
        }
    }

    #[test]
    fn refusals_are_counted_by_reason_and_logged_once_a_minute() {
        let r = Refusals::new(Arc::new(Status::new(std::time::SystemTime::now())));
        for _ in 0..3 {
            r.refuse(Reason::CrossSite, || "x".into());
        }
        r.refuse(Reason::Host, || "y".into());
        let counted = r.status.read(|s| s.http_refused);
        assert_eq!(counted, [0, 0, 3, 1, 0, 0]);
        // The first logged, the next two held back for the next line.
        assert_eq!(r.log.lock().unwrap()[Reason::CrossSite as usize].1, 2);
    }
}
