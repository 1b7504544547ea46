//! A run CA, one certificate and key per role, and a run token, laid out as `[security]` /
//! `--security-dir` expect (`ca.crt`, `<role>.crt`, `<role>.key`, `token`): what `ril certs
//! init` writes, and what the local cluster generates for every launch. For Kubernetes the same
//! files go into Secrets (deploy/README.md).
//!
//! Each role's certificate names the role in a URI SAN (`urn:ril:role:<role>`, what servers
//! authorise by) and carries DNS/IP SANs for loopback and the role's Kubernetes Services. Keys
//! are ECDSA P-256, written 0600.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use ril_proto::security::Role;

use crate::error::{OrchestrateError, Result};

/// The files [`generate`] wrote.
#[derive(Debug)]
pub struct Written {
    pub files: Vec<PathBuf>,
}

/// DNS/IP names a role's certificate is valid for: loopback, and its Kubernetes Services
/// (`ril-<role>`, headless pods `*.ril-<role>`, namespace- and cluster-qualified forms).
fn role_sans(role: Role, namespace: &str, extra: &[String]) -> Vec<String> {
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    let service = format!("ril-{role}");
    let mut services = vec![service.clone()];
    if role == Role::Teacher {
        // The base manifests' teacher; more teachers: `--san ril-teacher-<name>`.
        services.push("ril-teacher-terse".into());
    }
    for s in services {
        sans.push(s.clone());
        sans.push(format!("*.{s}"));
        sans.push(format!("{s}.{namespace}.svc"));
        sans.push(format!("*.{s}.{namespace}.svc"));
        sans.push(format!("{s}.{namespace}.svc.cluster.local"));
        sans.push(format!("*.{s}.{namespace}.svc.cluster.local"));
    }
    sans.extend(extra.iter().cloned());
    sans
}

fn write(path: &Path, contents: &[u8], secret: bool) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let failed = || OrchestrateError::io(format!("writing {}", path.display()));
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    o.mode(if secret { 0o600 } else { 0o644 });
    let mut f = o.open(path).map_err(failed())?;
    #[cfg(unix)]
    if secret {
        // `mode` applies only to new files; a replaced key must not keep wider permissions.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(failed())?;
    }
    f.write_all(contents).map_err(failed())
}

/// A fresh run token: 32 random bytes, hex.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn certificate_error(what: String) -> impl FnOnce(rcgen::Error) -> OrchestrateError {
    move |error| OrchestrateError::Certificate { what, error }
}

/// Refuses to overwrite what an earlier `generate` wrote unless `force`.
fn check_absent(dir: &Path, force: bool) -> Result<()> {
    let mut names = vec!["ca.crt".to_string(), "ca.key".into(), "token".into()];
    for r in Role::ALL {
        names.push(format!("{r}.crt"));
        names.push(format!("{r}.key"));
    }
    let present: Vec<&str> = names
        .iter()
        .filter(|n| dir.join(n).exists())
        .map(String::as_str)
        .collect();
    if force || present.is_empty() {
        return Ok(());
    }
    Err(OrchestrateError::CertificatesPresent {
        dir: dir.to_path_buf(),
        present: present.join(", "),
    })
}

/// The run CA: its certificate (written as `ca.crt`, its key as `ca.key`) and the issuer that
/// signs the role certificates.
fn make_ca(dir: &Path, files: &mut Vec<PathBuf>) -> Result<Issuer<'static, KeyPair>> {
    let ca_key = KeyPair::generate().map_err(certificate_error("generating the CA key".into()))?;
    let mut ca = CertificateParams::new(Vec::<String>::new())
        .map_err(certificate_error("the CA's names".into()))?;
    ca.distinguished_name.push(DnType::CommonName, "ril run CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca
        .self_signed(&ca_key)
        .map_err(certificate_error("signing the CA".into()))?;
    write(&dir.join("ca.crt"), ca_cert.pem().as_bytes(), false)?;
    write(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes(), true)?;
    files.push(dir.join("ca.crt"));
    files.push(dir.join("ca.key"));
    Ok(Issuer::new(ca, ca_key))
}

/// `role`'s certificate and key, signed by `issuer`.
fn make_role_certificate(
    dir: &Path,
    role: Role,
    sans: Vec<String>,
    issuer: &Issuer<'static, KeyPair>,
    files: &mut Vec<PathBuf>,
) -> Result<()> {
    let key =
        KeyPair::generate().map_err(certificate_error(format!("generating the {role} key")))?;
    let mut p = CertificateParams::new(sans)
        .map_err(certificate_error(format!("the {role} certificate's names")))?;
    let uri = role.uri().try_into().map_err(certificate_error(format!(
        "the {role} certificate's role URI"
    )))?;
    p.subject_alt_names.push(SanType::URI(uri));
    p.distinguished_name
        .push(DnType::CommonName, format!("ril-{role}"));
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // One certificate serves the role's server and its clients.
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = p
        .signed_by(&key, issuer)
        .map_err(certificate_error(format!("signing the {role} certificate")))?;
    let (c, k) = (
        dir.join(format!("{role}.crt")),
        dir.join(format!("{role}.key")),
    );
    write(&c, cert.pem().as_bytes(), false)?;
    write(&k, key.serialize_pem().as_bytes(), true)?;
    files.push(c);
    files.push(k);
    Ok(())
}

/// Writes a CA, per-role certificates and keys, and a token into `dir`.
pub fn generate(
    dir: &Path,
    extra_sans: &[String],
    namespace: &str,
    force: bool,
) -> Result<Written> {
    std::fs::create_dir_all(dir)
        .map_err(OrchestrateError::io(format!("creating {}", dir.display())))?;
    check_absent(dir, force)?;
    let mut files = Vec::new();
    let issuer = make_ca(dir, &mut files)?;
    for role in Role::ALL {
        let sans = role_sans(role, namespace, extra_sans);
        make_role_certificate(dir, role, sans, &issuer, &mut files)?;
    }
    let token = dir.join("token");
    write(&token, format!("{}\n", new_token()).as_bytes(), true)?;
    files.push(token);
    Ok(Written { files })
}
