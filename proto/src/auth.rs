//! Credentials on the wire: bearer tokens (`authorization: Bearer TOKEN` metadata) and TLS.
//!
//! Shared by the coordinator (which checks tokens) and its clients, the worker runtime and the
//! CLI (which send them). The roles and which RPC needs which are the coordinator's business
//! (`liandan_coordinator::auth`); this module only knows where tokens come from.
//!
//! A token source is a literal (from an environment variable) or a file with one token per
//! line, blank lines and `#` comments skipped. A file is read again at most every
//! [`RELOAD_EVERY`], so tokens rotate without restarting anything: the coordinator accepts every
//! token of its file, a client sends the first.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use crate::v1::coordinator_client::CoordinatorClient;

/// How often a token file is read again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// Shortest token accepted: a guessable token is worse than none, because it looks safe.
pub const MIN_TOKEN_LEN: usize = 16;

/// The environment variable holding the admin token (coordinator: accepted; CLI: sent).
pub const ADMIN_TOKEN_ENV: &str = "LIANDAN_ADMIN_TOKEN";
/// The environment variable holding the worker token (coordinator: accepted; worker: sent).
pub const WORKER_TOKEN_ENV: &str = "LIANDAN_WORKER_TOKEN";

/// Errors reading credentials.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{origin}: no token (the file or variable is empty)")]
    Empty { origin: String },
    #[error("{origin}: a token is {len} characters; at least {MIN_TOKEN_LEN} are needed (e.g. openssl rand -hex 32)")]
    TooShort { origin: String, len: usize },
    #[error("{origin}: a token must be printable ASCII without spaces")]
    NotAscii { origin: String },
    #[error("TLS: {0}")]
    Tls(String),
}

#[derive(Debug)]
enum Origin {
    Literal,
    File { path: PathBuf, read_at: Instant },
}

#[derive(Debug)]
struct SourceState {
    origin: Origin,
    tokens: Arc<Vec<String>>,
}

/// Where a role's tokens come from; cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct TokenSource {
    state: Arc<Mutex<SourceState>>,
    what: String,
}

fn parse_tokens(text: &str, origin: &str) -> Result<Vec<String>, AuthError> {
    let tokens: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect();
    if tokens.is_empty() {
        return Err(AuthError::Empty { origin: origin.to_string() });
    }
    for t in &tokens {
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuthError::NotAscii { origin: origin.to_string() });
        }
        if t.len() < MIN_TOKEN_LEN {
            return Err(AuthError::TooShort { origin: origin.to_string(), len: t.len() });
        }
    }
    Ok(tokens)
}

fn read_file(path: &Path) -> Result<Vec<String>, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|e| AuthError::Io { path: path.display().to_string(), source: e })?;
    parse_tokens(&text, &path.display().to_string())
}

impl TokenSource {
    /// One literal token (from an environment variable or a test).
    pub fn literal(token: &str, what: &str) -> Result<Self, AuthError> {
        let tokens = parse_tokens(token, what)?;
        Ok(TokenSource { state: Arc::new(Mutex::new(SourceState { origin: Origin::Literal, tokens: Arc::new(tokens) })), what: what.to_string() })
    }

    /// Tokens from a file, read now (so a missing or empty file fails at start) and again at
    /// most every [`RELOAD_EVERY`].
    pub fn file(path: &Path) -> Result<Self, AuthError> {
        let tokens = read_file(path)?;
        let origin = Origin::File { path: path.to_path_buf(), read_at: Instant::now() };
        Ok(TokenSource { state: Arc::new(Mutex::new(SourceState { origin, tokens: Arc::new(tokens) })), what: path.display().to_string() })
    }

    /// The file if given, else the environment variable `env`, else None.
    pub fn from_file_or_env(file: Option<&Path>, env: &str) -> Result<Option<Self>, AuthError> {
        if let Some(f) = file {
            return Self::file(f).map(Some);
        }
        match std::env::var(env) {
            Ok(v) => Self::literal(&v, env).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Where the tokens come from (a path or a variable name), for messages; never a token.
    pub fn origin(&self) -> &str {
        &self.what
    }

    /// The current tokens. A file that became unreadable or empty keeps its last good tokens
    /// (a half-written file during rotation must not lock everyone out).
    pub fn tokens(&self) -> Arc<Vec<String>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Origin::File { path, read_at } = &mut st.origin
            && read_at.elapsed() >= RELOAD_EVERY
        {
            *read_at = Instant::now();
            if let Ok(t) = read_file(path) {
                st.tokens = Arc::new(t);
            }
        }
        st.tokens.clone()
    }

    /// The token a client sends: the first.
    pub fn first(&self) -> String {
        // parse_tokens never yields an empty list.
        self.tokens().first().cloned().unwrap_or_default()
    }

    /// Whether `presented` equals one of the tokens, in time independent of where they differ.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        self.tokens().iter().fold(false, |ok, t| ok | constant_time_eq(t.as_bytes(), presented))
    }
}

/// A fresh random token: 32 bytes from the operating system's generator, hex.
pub fn random_token() -> Result<String, AuthError> {
    Ok(hex(&random_bytes::<32>()?))
}

/// `N` bytes from the operating system's generator.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], AuthError> {
    use std::io::Read;
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).map_err(|e| AuthError::Io { path: "/dev/urandom".into(), source: e })?;
    Ok(b)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes from lower- or upper-case hex; None when `s` is not hex of whole bytes.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect()
}

/// HMAC-SHA256 under `key` of the parts, each prefixed with its length (so no two different
/// lists of parts give the same input). Used for worker secrets and ring hellos.
pub fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    use hmac::Mac;
    keyed(key, parts).finalize().into_bytes().into()
}

/// Whether `tag` is `mac(key, parts)`, compared in constant time.
pub fn mac_ok(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    use hmac::Mac;
    keyed(key, parts).verify_slice(tag).is_ok()
}

fn keyed(key: &[u8], parts: &[&[u8]]) -> hmac::Hmac<sha2::Sha256> {
    use hmac::Mac;
    // HMAC takes keys of any length, so this cannot fail.
    let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for p in parts {
        m.update(&(p.len() as u64).to_le_bytes());
        m.update(p);
    }
    m
}

/// Equality whose time depends only on the lengths: both sides are hashed to 32 bytes and the
/// digests compared with every byte visited.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    let diff = x.iter().zip(y.iter()).fold(0u8, |acc, (p, q)| acc | (p ^ q));
    std::hint::black_box(diff) == 0
}

/// The bearer token from request metadata (`authorization: Bearer TOKEN`), if well formed.
pub fn bearer(value: Option<&[u8]>) -> Option<&[u8]> {
    let v = value?;
    let prefix = b"Bearer ";
    (v.len() > prefix.len() && v[..prefix.len()].eq_ignore_ascii_case(prefix)).then(|| &v[prefix.len()..])
}

/// A client interceptor that adds `authorization: Bearer TOKEN` to every call (nothing when
/// the client has no token: the coordinator then answers UNAUTHENTICATED).
#[derive(Debug, Clone, Default)]
pub struct Bearer {
    source: Option<TokenSource>,
}

impl Bearer {
    pub fn new(source: Option<TokenSource>) -> Self {
        Bearer { source }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(s) = &self.source {
            let v: MetadataValue<_> =
                format!("Bearer {}", s.first()).parse().map_err(|_| Status::unauthenticated(format!("the token from {} is not a valid header value", s.origin())))?;
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

/// The coordinator client with credentials attached.
pub type Client = CoordinatorClient<InterceptedService<Channel, Bearer>>;

/// TLS files of a process (PEM): its certificate and key, and the cluster CA.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

fn read_pem(p: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(p).map_err(|e| AuthError::Io { path: p.display().to_string(), source: e })
}

impl TlsFiles {
    pub fn is_empty(&self) -> bool {
        self.cert.is_none() && self.key.is_none() && self.ca.is_none()
    }

    /// This process's identity, when both certificate and key are given.
    pub fn identity(&self) -> Result<Option<Identity>, AuthError> {
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Ok(Some(Identity::from_pem(read_pem(c)?, read_pem(k)?))),
            (None, None) => Ok(None),
            _ => Err(AuthError::Tls("--tls-cert and --tls-key go together".into())),
        }
    }

    /// The cluster CA, if given.
    pub fn ca(&self) -> Result<Option<Certificate>, AuthError> {
        self.ca.as_deref().map(|p| read_pem(p).map(Certificate::from_pem)).transpose()
    }

    /// Client TLS: verify the coordinator with the CA, present our certificate if we have one.
    pub fn client_config(&self) -> Result<Option<ClientTlsConfig>, AuthError> {
        if self.is_empty() {
            return Ok(None);
        }
        let mut c = ClientTlsConfig::new();
        if let Some(ca) = self.ca()? {
            c = c.ca_certificate(ca);
        }
        if let Some(id) = self.identity()? {
            c = c.identity(id);
        }
        Ok(Some(c))
    }
}

/// An endpoint for `addr` (`http://` or `https://`) with TLS when `tls` names files.
pub fn endpoint(addr: &str, tls: &TlsFiles) -> Result<Endpoint, AuthError> {
    let mut ep = Endpoint::from_shared(addr.to_string()).map_err(|e| AuthError::Tls(format!("coordinator address {addr}: {e}")))?;
    if let Some(c) = tls.client_config()? {
        if !addr.starts_with("https://") {
            return Err(AuthError::Tls(format!("TLS files are given but the coordinator address {addr} is not https://")));
        }
        ep = ep.tls_config(c).map_err(|e| AuthError::Tls(e.to_string()))?;
    }
    Ok(ep)
}

/// The largest reply a client decodes: a job's status with its evaluations, a page of 2,000
/// workers, a comparison with two long answers all fit well inside.
pub const MAX_REPLY_BYTES: usize = 64 << 20;

/// A client on `channel` that sends `token`.
pub fn client(channel: Channel, token: Option<TokenSource>) -> Client {
    CoordinatorClient::with_interceptor(channel, Bearer::new(token)).max_decoding_message_size(MAX_REPLY_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_compare_and_reload() {
        assert!(matches!(parse_tokens("\n# c\n", "f"), Err(AuthError::Empty { .. })));
        assert!(matches!(parse_tokens("short", "f"), Err(AuthError::TooShort { len: 5, .. })));
        assert!(matches!(parse_tokens("with space in the token", "f"), Err(AuthError::NotAscii { .. })));
        let dir = std::env::temp_dir().join(format!("liandan-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("tokens");
        std::fs::write(&f, "# rotation\nnew-token-0123456789\nold-token-0123456789\n").unwrap();
        let s = TokenSource::file(&f).unwrap();
        assert_eq!(s.first(), "new-token-0123456789");
        assert!(s.accepts(b"old-token-0123456789") && s.accepts(b"new-token-0123456789"));
        assert!(!s.accepts(b"old-token-012345678") && !s.accepts(b"") && !s.accepts(b"old-token-01234567890"));
        assert_eq!(bearer(Some(b"Bearer abc")), Some(&b"abc"[..]));
        assert_eq!(bearer(Some(b"bearer abc")), Some(&b"abc"[..]));
        assert_eq!(bearer(Some(b"Basic abc")), None);
        assert_eq!(bearer(Some(b"Bearer ")), None);
        assert!(matches!(TokenSource::file(&dir.join("absent")), Err(AuthError::Io { .. })));
    }
}
