//! Authentication, TLS and per-role authorisation for every ril gRPC server and client.
//!
//! - **Run token**: every RPC except `grpc.health.v1` carries `authorization: Bearer <token>`.
//!   Servers compare it in constant time (SHA-256 of both sides, then an xor fold, so neither
//!   the content nor the length leaks through timing) and answer `UNAUTHENTICATED` naming the
//!   method when it is missing or wrong. The token is never logged: [`Token`]'s `Debug` is
//!   redacted and the client marks the header sensitive.
//! - **TLS** (rustls with ring) on every server and client, against the run's CA. With
//!   **mutual TLS** (`mtls = true`, the default) clients present their role's certificate; the
//!   role is the certificate's URI SAN `urn:ril:role:<role>` (chosen over CN/OU because webpki
//!   already parses SANs, so no X.509 parser is needed, and a SAN is what a certificate
//!   verifier checks). TLS accepts a connection without a client certificate (so probes and
//!   health checks work); every non-health RPC on such a connection is refused. A certificate
//!   from another CA fails the handshake.
//! - **Authorisation**: [`allowed_roles`] is the one table of which role may call which method,
//!   enforced by [`AuthLayer`] for every server, in front of every service.
//! - **Reflection** answers only where enabled (local mode); elsewhere it is refused.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tonic::Status;
use tonic::codegen::http;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The header the run token travels in (`Bearer <token>`).
pub const AUTHORIZATION: &str = "authorization";
/// The URI SAN prefix that names a certificate's role.
pub const ROLE_URI_PREFIX: &str = "urn:ril:role:";
/// Shortest accepted run token: shorter ones are guessable.
pub const MIN_TOKEN_BYTES: usize = 16;

/// Who a certificate says its holder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Coordinator,
    Learner,
    Actor,
    Teacher,
    Discriminator,
    /// Operators' tools: `ril status`, the local cluster's supervisor.
    Admin,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Coordinator,
        Role::Learner,
        Role::Actor,
        Role::Teacher,
        Role::Discriminator,
        Role::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Learner => "learner",
            Role::Actor => "actor",
            Role::Teacher => "teacher",
            Role::Discriminator => "discriminator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The URI SAN that names this role in a certificate.
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.as_str())
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

use Role::{Actor, Admin, Discriminator, Learner};

const EVERY_ROLE: &[Role] = &Role::ALL;

/// Which roles may call `method` (`/package.Service/Method`). `None`: a method outside the
/// table, which with mutual TLS no role may call (fail-closed; a test checks that every RPC of
/// the proto files is listed).
///
/// Learner ranks share one certificate role. That only rank 0 accepts groups and publishes
/// versions is checked by the coordinator with rank 0's publisher key (JoinLearnerRequest
/// `publisher_key`), and only rank 0 may bring the NCCL id.
pub fn allowed_roles(method: &str) -> Option<&'static [Role]> {
    let (service, name) = method.trim_start_matches('/').split_once('/')?;
    let roles: &'static [Role] = match (service, name) {
        (
            "ril.v1.Coordinator",
            "RegisterActor" | "Heartbeat" | "LeasePrompts" | "CompleteLease" | "ReturnQuestion",
        ) => &[Actor],
        (
            "ril.v1.Coordinator",
            "AcceptGroup" | "PublishVersion" | "JoinLearner" | "ReportMetrics",
        ) => &[Learner],
        ("ril.v1.Coordinator", "GetStatus") => EVERY_ROLE,
        ("ril.v1.Learner", "PushGroups") => &[Actor],
        ("ril.v1.Learner", "GetWeights") => &[Actor, Admin],
        ("ril.v1.Learner", "Info") => EVERY_ROLE,
        ("ril.v1.LearnerRanks", "TrainShard") => &[Learner],
        ("ril.v1.Teacher", "Answer") => &[Actor, Discriminator, Admin],
        ("ril.v1.Teacher", "Info") => EVERY_ROLE,
        ("ril.v1.Discriminator", "Score") => &[Actor, Admin],
        ("ril.v1.Discriminator", "Train") => &[Learner],
        ("ril.v1.Discriminator", "Info") => EVERY_ROLE,
        (s, _) if s.starts_with("grpc.reflection.") => EVERY_ROLE,
        _ => return None,
    };
    Some(roles)
}

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("cannot read the {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the run token {from} is empty")]
    EmptyToken { from: String },
    #[error(
        "the run token {from} is {len} bytes; use at least {MIN_TOKEN_BYTES} (`ril certs init` writes one)"
    )]
    ShortToken { from: String, len: usize },
    #[error("the run token {from} holds characters that cannot travel in a gRPC header")]
    TokenNotAscii { from: String },
    #[error("the environment variable {var} (the run token) is not set")]
    TokenEnvUnset { var: String },
    #[error(
        "[security] needs {what} for the {role} role; run `ril certs init DIR` and pass \
         `--security-dir DIR`, fill the [security] keys, or set `allow_insecure = true` to run \
         without authentication (debugging only)"
    )]
    Missing { what: &'static str, role: Role },
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// The run token. Its `Debug` never shows it.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Checks and wraps a token read from `from` (a file name or a variable, for errors only).
    pub fn new(raw: &str, from: &str) -> Result<Token, SecurityError> {
        let t = raw.trim();
        if t.is_empty() {
            return Err(SecurityError::EmptyToken { from: from.into() });
        }
        if t.len() < MIN_TOKEN_BYTES {
            return Err(SecurityError::ShortToken {
                from: from.into(),
                len: t.len(),
            });
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(SecurityError::TokenNotAscii { from: from.into() });
        }
        Ok(Token(t.into()))
    }

    pub fn from_file(path: &Path) -> Result<Token, SecurityError> {
        let raw = std::fs::read_to_string(path).map_err(|source| SecurityError::Read {
            what: "run token file",
            path: path.to_path_buf(),
            source,
        })?;
        Token::new(&raw, &format!("in {}", path.display()))
    }

    pub fn from_env(var: &str) -> Result<Token, SecurityError> {
        let raw =
            std::env::var(var).map_err(|_| SecurityError::TokenEnvUnset { var: var.into() })?;
        Token::new(&raw, &format!("in ${var}"))
    }

    /// Constant-time equality with `presented` (hashes first, so lengths do not leak either).
    pub fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(
            &Sha256::digest(self.0.as_bytes()),
            &Sha256::digest(presented),
        )
    }

    fn header_value(&self) -> AsciiMetadataValue {
        let mut v: AsciiMetadataValue = format!("Bearer {}", self.0)
            .parse()
            .expect("checked: the token is printable ASCII");
        v.set_sensitive(true);
        v
    }
}

/// Equality of two secrets (or their digests) whose time depends only on the length, by the
/// `subtle` crate (whose comparison the optimiser cannot turn into an early exit). Different
/// lengths are unequal.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// `[security]` in a run config: where the run token and the certificates are. Paths may hold
/// `{role}`, replaced by the process's role (`certs/{role}.crt`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// A file holding the run token (e.g. a mounted Kubernetes Secret).
    pub token_file: Option<PathBuf>,
    /// An environment variable holding the run token (e.g. filled from a Secret).
    pub token_env: Option<String>,
    /// The run CA's certificate (PEM).
    pub ca: Option<PathBuf>,
    /// This role's certificate and key (PEM).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Clients present their certificate and servers check the caller's role.
    pub mtls: bool,
    /// Plaintext, no token, no roles. For debugging only; loudly logged.
    pub allow_insecure: bool,
    /// Serve gRPC server reflection (to token holders). Off in production, on in local mode.
    pub reflection: bool,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            token_file: None,
            token_env: None,
            ca: None,
            cert: None,
            key: None,
            mtls: true,
            allow_insecure: false,
            reflection: false,
        }
    }
}

impl SecurityConfig {
    /// The layout `ril certs init DIR` writes: `ca.crt`, `<role>.crt`, `<role>.key`, `token`.
    pub fn from_dir(dir: &Path) -> Self {
        Self {
            token_file: Some(dir.join("token")),
            ca: Some(dir.join("ca.crt")),
            cert: Some(dir.join("{role}.crt")),
            key: Some(dir.join("{role}.key")),
            ..Self::default()
        }
    }

    /// Reads the token and certificates for `role`.
    pub fn resolve(&self, role: Role) -> Result<Security, SecurityError> {
        if self.allow_insecure {
            tracing::warn!(
                %role,
                "SECURITY IS OFF ([security] allow_insecure): plaintext gRPC, no run token, no \
                 roles; anyone who can reach this process can drive it"
            );
            return Ok(Security {
                reflection: self.reflection,
                ..Security::plaintext(role)
            });
        }
        let token = match (&self.token_file, &self.token_env) {
            (Some(f), _) => Token::from_file(&fill(f, role))?,
            (None, Some(v)) => Token::from_env(v)?,
            (None, None) => {
                return Err(SecurityError::Missing {
                    what: "a run token (token_file or token_env)",
                    role,
                });
            }
        };
        let read = |what: &'static str, p: &Option<PathBuf>| -> Result<Vec<u8>, SecurityError> {
            let p = p.as_ref().ok_or(SecurityError::Missing { what, role })?;
            let p = fill(p, role);
            std::fs::read(&p).map_err(|source| SecurityError::Read {
                what,
                path: p,
                source,
            })
        };
        let tls = TlsFiles {
            ca: read("CA certificate (ca)", &self.ca)?,
            cert: read("certificate (cert)", &self.cert)?,
            key: read("private key (key)", &self.key)?,
        };
        Ok(Security {
            role,
            token: Some(token),
            tls: Some(Arc::new(tls)),
            mtls: self.mtls,
            reflection: self.reflection,
        })
    }
}

fn fill(p: &Path, role: Role) -> PathBuf {
    PathBuf::from(p.to_string_lossy().replace("{role}", role.as_str()))
}

/// PEM bytes of the run CA and this process's certificate and key.
struct TlsFiles {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// A process's resolved security settings, shared by its servers and clients.
#[derive(Clone)]
pub struct Security {
    pub role: Role,
    token: Option<Token>,
    tls: Option<Arc<TlsFiles>>,
    pub mtls: bool,
    pub reflection: bool,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("role", &self.role)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .field("mtls", &self.mtls)
            .field("reflection", &self.reflection)
            .finish()
    }
}

impl Default for Security {
    /// Plaintext: what in-process unit tests and stub servers use. Processes started by the
    /// `ril` binary always resolve a [`SecurityConfig`] instead.
    fn default() -> Self {
        Security::plaintext(Role::Admin)
    }
}

impl Security {
    /// No TLS, no token, no roles, reflection on.
    pub fn plaintext(role: Role) -> Self {
        Self {
            role,
            token: None,
            tls: None,
            mtls: false,
            reflection: true,
        }
    }

    /// The same settings speaking as another role (tests).
    pub fn with_token(mut self, token: Option<Token>) -> Self {
        self.token = token;
        self
    }

    /// The run token these settings send (tests build wrong combinations from it).
    pub fn token_for_tests(&self) -> Option<Token> {
        self.token.clone()
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// The key the learner ranks authenticate their CPU ring connections with: SHA-256 of a
    /// fixed label and the run token (the token itself never goes on the ring's wire). `None`
    /// without a token (security off).
    pub fn collective_key(&self) -> Option<[u8; 32]> {
        let token = self.token.as_ref()?;
        let mut h = Sha256::new();
        h.update(b"ril collective key v1\0");
        h.update(token.0.as_bytes());
        Some(h.finalize().into())
    }

    /// The server side of TLS (client certificates checked against the CA when presented).
    pub fn server_tls(&self) -> Option<ServerTlsConfig> {
        let tls = self.tls.as_ref()?;
        let mut c = ServerTlsConfig::new()
            .identity(Identity::from_pem(&tls.cert, &tls.key))
            .timeout(std::time::Duration::from_secs(10));
        if self.mtls {
            // Optional at the handshake so that health checks need no certificate; the
            // authorisation layer refuses every other RPC without one.
            c = c
                .client_ca_root(Certificate::from_pem(&tls.ca))
                .client_auth_optional(true);
        }
        Some(c)
    }

    /// The client side of TLS (the server checked against the run CA; our certificate sent
    /// under mTLS).
    pub fn client_tls(&self) -> Option<ClientTlsConfig> {
        let tls = self.tls.as_ref()?;
        let mut c = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&tls.ca))
            .timeout(std::time::Duration::from_secs(10));
        if self.mtls {
            c = c.identity(Identity::from_pem(&tls.cert, &tls.key));
        }
        Some(c)
    }

    /// The interceptor that puts the token on every outgoing call.
    pub fn client_auth(&self) -> ClientAuth {
        ClientAuth {
            header: self.token.as_ref().map(Token::header_value),
        }
    }
}

/// Adds the run token to every request of a client.
#[derive(Clone)]
pub struct ClientAuth {
    header: Option<AsciiMetadataValue>,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientAuth(<redacted>)")
    }
}

impl tonic::service::Interceptor for ClientAuth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert(AUTHORIZATION, h.clone());
        }
        Ok(request)
    }
}

/// The role a verified client certificate names (its `urn:ril:role:` URI SAN).
pub fn role_of_certificate(der: &[u8]) -> Option<Role> {
    let der = rustls_pki_types::CertificateDer::from(der);
    let cert = webpki::EndEntityCert::try_from(&der).ok()?;
    cert.valid_uri_names()
        .filter_map(|u| u.strip_prefix(ROLE_URI_PREFIX))
        .find_map(Role::parse)
}

/// The policy [`AuthLayer`] enforces.
#[derive(Debug, Clone)]
struct Policy {
    token: Option<Token>,
    mtls: bool,
    reflection: bool,
}

impl Policy {
    /// `Ok` or the status that refuses the call.
    fn check<B>(&self, req: &http::Request<B>) -> Result<(), Status> {
        let method = req.uri().path();
        if method.starts_with("/grpc.health.v1.Health/") {
            return Ok(());
        }
        if method.starts_with("/grpc.reflection.") && !self.reflection {
            return Err(Status::permission_denied(format!(
                "{method}: server reflection is off on this server ([security] reflection)"
            )));
        }
        if let Some(token) = &self.token {
            let presented = req
                .headers()
                .get(AUTHORIZATION)
                .map(|v| v.as_bytes())
                .and_then(|v| v.strip_prefix(b"Bearer ".as_slice()));
            match presented {
                None => {
                    return Err(Status::unauthenticated(format!(
                        "{method}: no run token (send `authorization: Bearer <token>`)"
                    )));
                }
                Some(p) if !token.matches(p) => {
                    return Err(Status::unauthenticated(format!(
                        "{method}: wrong run token"
                    )));
                }
                Some(_) => {}
            }
        }
        if self.mtls {
            let certs = req
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.peer_certs());
            let Some(first) = certs.as_ref().and_then(|c| c.first()) else {
                return Err(Status::unauthenticated(format!(
                    "{method}: no client certificate (mutual TLS is on; present your role's \
                     certificate from the run CA)"
                )));
            };
            let Some(role) = role_of_certificate(first) else {
                return Err(Status::permission_denied(format!(
                    "{method}: the client certificate names no ril role (URI SAN \
                     {ROLE_URI_PREFIX}<role>)"
                )));
            };
            authorise(method, role)?;
        }
        Ok(())
    }
}

/// Whether `role` may call `method` by [`allowed_roles`]. Fail-closed: a method the table does
/// not list is called by no role.
fn authorise(method: &str, role: Role) -> Result<(), Status> {
    let Some(allowed) = allowed_roles(method) else {
        return Err(Status::permission_denied(format!(
            "{method}: no role may call it (it is not in the role table, \
             ril_proto::security::allowed_roles)"
        )));
    };
    if !allowed.contains(&role) {
        let names: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
        return Err(Status::permission_denied(format!(
            "{method} may be called by {}, not by the {role} role",
            names.join(" or ")
        )));
    }
    Ok(())
}

/// The tower layer every ril server runs in front of its services: health passes, reflection
/// only where enabled, then the run token, then the caller's role against [`allowed_roles`].
#[derive(Debug, Clone)]
pub struct AuthLayer {
    policy: Arc<Policy>,
}

impl AuthLayer {
    pub fn new(security: &Security) -> Self {
        Self {
            policy: Arc::new(Policy {
                token: security.token.clone(),
                mtls: security.mtls && security.tls.is_some(),
                reflection: security.reflection,
            }),
        }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    policy: Arc<Policy>,
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S, B, R> tower_service::Service<http::Request<B>> for AuthService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.policy.check(&req) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(status) => {
                tracing::warn!(
                    method = req.uri().path(),
                    code = ?status.code(),
                    reason = status.message(),
                    "refused a call"
                );
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_by_content_and_never_print() {
        let t = Token::new("0123456789abcdef0123", "test").unwrap();
        assert!(t.matches(b"0123456789abcdef0123"));
        assert!(!t.matches(b"0123456789abcdef0124"));
        assert!(!t.matches(b"0123456789abcdef012"));
        assert!(!t.matches(b""));
        assert!(!format!("{t:?}").contains("0123"));
        assert!(matches!(
            Token::new("short", "test"),
            Err(SecurityError::ShortToken { .. })
        ));
        assert!(matches!(
            Token::new("  \n", "test"),
            Err(SecurityError::EmptyToken { .. })
        ));
    }

    #[test]
    fn the_table_names_who_may_call_what() {
        let may = |m: &str, r: Role| allowed_roles(m).unwrap().contains(&r);
        assert!(may("/ril.v1.Coordinator/PublishVersion", Learner));
        assert!(!may("/ril.v1.Coordinator/PublishVersion", Actor));
        assert!(may("/ril.v1.Learner/PushGroups", Actor));
        assert!(!may("/ril.v1.Learner/PushGroups", Role::Teacher));
        assert!(may("/ril.v1.Coordinator/JoinLearner", Learner));
        assert!(!may("/ril.v1.Coordinator/JoinLearner", Actor));
        assert!(may("/ril.v1.Coordinator/GetStatus", Admin));
        assert!(!may("/ril.v1.Discriminator/Train", Actor));
        assert!(allowed_roles("/ril.v1.Coordinator/NoSuchMethod").is_none());
    }

    #[test]
    fn every_rpc_in_the_proto_files_has_an_entry_in_the_role_table() {
        use prost::Message;
        let fds = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
        let mut methods = Vec::new();
        for file in &fds.file {
            for service in &file.service {
                for method in &service.method {
                    methods.push(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        // The five services' RPCs (coordinator.proto alone has ten).
        assert!(methods.len() >= 19, "{methods:?}");
        let unlisted: Vec<&String> = methods
            .iter()
            .filter(|m| allowed_roles(m).is_none_or(|roles| roles.is_empty()))
            .collect();
        assert!(unlisted.is_empty(), "RPCs no role may call: {unlisted:?}");
    }

    #[test]
    fn a_method_outside_the_table_is_refused_to_every_role() {
        for role in Role::ALL {
            let status = authorise("/ril.v1.Coordinator/NoSuchMethod", role).unwrap_err();
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{role}");
            assert!(
                status.message().contains("not in the role table"),
                "{status:?}"
            );
            let status = authorise("/ril.v1.Discriminator/Train", role);
            assert_eq!(status.is_ok(), role == Learner, "{role}: {status:?}");
        }
    }

    #[test]
    fn config_rejects_unknown_keys_and_says_what_is_missing() {
        let e = toml::from_str::<SecurityConfig>("tokn_file = 'x'").unwrap_err();
        assert!(e.to_string().contains("tokn_file"), "{e}");
        let e = SecurityConfig::default().resolve(Actor).unwrap_err();
        assert!(e.to_string().contains("ril certs init"), "{e}");
    }
}
