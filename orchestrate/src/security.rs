//! How a process finds its run token and certificates, and the local cluster's own: a CA,
//! role certificates and a token generated for every launch, so that a local run takes the
//! secure path too.

use std::path::PathBuf;

use ril_config::RunConfig;
use ril_proto::security::{Role, Security, SecurityConfig};

use crate::error::{OrchestrateError, Result};

/// What the command line says about security, over the run config's `[security]`.
#[derive(Debug, Clone, Default)]
pub struct SecurityOverrides {
    /// A directory as `ril certs init` writes it; overrides `[security]`'s paths.
    pub security_dir: Option<PathBuf>,
    /// Plaintext, no token, no roles.
    pub insecure: bool,
    /// Serve gRPC reflection.
    pub reflection: bool,
}

/// The process's security for `role`: `insecure`, then `security_dir`, then `[security]`.
pub fn resolve_security(
    config: Option<&SecurityConfig>,
    overrides: &SecurityOverrides,
    role: Role,
) -> Result<Security> {
    let base = config.cloned().unwrap_or_default();
    let mut c = match &overrides.security_dir {
        Some(dir) => SecurityConfig {
            mtls: base.mtls,
            reflection: base.reflection,
            ..SecurityConfig::from_dir(dir)
        },
        None => base,
    };
    c.allow_insecure |= overrides.insecure;
    c.reflection |= overrides.reflection;
    let s = c
        .resolve(role)
        .map_err(|error| OrchestrateError::Security { role, error })?;
    tracing::info!(%role, tls = s.is_tls(), mtls = s.mtls, token = s.has_token(), reflection = s.reflection, "security");
    Ok(s)
}

/// The local cluster's security: the flags every child gets and the supervisor's own (admin)
/// settings.
#[derive(Clone)]
pub struct LocalSecurity {
    pub flags: Vec<String>,
    pub admin: Security,
}

impl std::fmt::Debug for LocalSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSecurity")
            .field("flags", &self.flags)
            .finish()
    }
}

/// By default a fresh CA, role certificates and token are generated into
/// `<run dir>/security/` for every launch, so the local run takes the secure path (TLS, mutual
/// TLS, token, roles; reflection on). A `[security]` naming its own files is used as written;
/// `allow_insecure = true` turns everything off (loudly).
pub fn local_security(cfg: &RunConfig) -> Result<LocalSecurity> {
    let sec = &cfg.security;
    let none = SecurityOverrides::default();
    if sec.allow_insecure {
        let admin = resolve_security(Some(sec), &none, Role::Admin)?;
        let flags = vec!["--insecure".into()];
        return Ok(LocalSecurity { flags, admin });
    }
    let own = sec.token_file.is_some()
        || sec.token_env.is_some()
        || sec.ca.is_some()
        || sec.cert.is_some()
        || sec.key.is_some();
    if own {
        let admin = resolve_security(Some(sec), &none, Role::Admin)?;
        let flags = vec!["--reflection".into()];
        return Ok(LocalSecurity { flags, admin });
    }
    let dir = cfg.run.dir.join("security");
    crate::certs::generate(&dir, &[], "ril", true)?;
    tracing::info!(dir = %dir.display(), "local cluster: TLS + mutual TLS + run token (generated for this launch)");
    let generated = SecurityOverrides {
        security_dir: Some(dir.clone()),
        insecure: false,
        reflection: true,
    };
    let admin = resolve_security(Some(sec), &generated, Role::Admin)?;
    let flags = vec![
        "--security-dir".into(),
        crate::arg(&dir),
        "--reflection".into(),
    ];
    Ok(LocalSecurity { flags, admin })
}
