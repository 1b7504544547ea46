//! `ril certs init DIR`: a run CA, one certificate and key per role, and a run token, laid out
//! as `[security]` / `--security-dir` expect (`ca.crt`, `<role>.crt`, `<role>.key`, `token`).
//! The local cluster calls [`generate`] for every run; for Kubernetes the same files go into
//! Secrets (deploy/README.md).
//!
//! Each role's certificate names the role in a URI SAN (`urn:ril:role:<role>`, what servers
//! authorise by) and carries DNS/IP SANs for loopback and the role's Kubernetes Services. Keys
//! are ECDSA P-256, written 0600.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use ril_proto::security::Role;

#[derive(Debug, clap::Args)]
pub struct CertsInitArgs {
    /// Where to write the CA, the role certificates and the token.
    pub dir: PathBuf,
    /// Extra subject alternative names (DNS names or IP addresses) for every role certificate,
    /// e.g. a teacher Service `ril-teacher-big` or a load balancer's name. Repeatable.
    #[arg(long = "san")]
    pub sans: Vec<String>,
    /// The Kubernetes namespace the Service names are qualified with.
    #[arg(long, default_value = "ril")]
    pub namespace: String,
    /// Replace files already in DIR.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, clap::Args)]
pub struct CertsSecretsArgs {
    /// A directory `ril certs init` wrote.
    pub dir: PathBuf,
    /// The namespace the Secrets are made in (the manifests' overlays use `ril`).
    #[arg(long, default_value = "ril")]
    pub namespace: String,
}

/// The Secret holding the run token (key `token`), mounted by every pod at `/etc/ril/token`.
pub const TOKEN_SECRET: &str = "ril-run-token";

/// The Secret holding `role`'s certificate and key and the CA certificate, mounted by that
/// role's pods (only theirs) at `/etc/ril/tls`.
pub fn tls_secret(role: Role) -> String {
    format!("ril-tls-{role}")
}

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

fn write(path: &Path, contents: &[u8], secret: bool) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    o.mode(if secret { 0o600 } else { 0o644 });
    let mut f = o
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    if secret {
        // `mode` applies only to new files; a replaced key must not keep wider permissions.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(contents)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A fresh run token: 32 random bytes, hex.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes a CA, per-role certificates and keys, and a token into `dir`.
pub fn generate(
    dir: &Path,
    extra_sans: &[String],
    namespace: &str,
    force: bool,
) -> anyhow::Result<Written> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut names = vec!["ca.crt".to_string(), "ca.key".into(), "token".into()];
    for r in Role::ALL {
        names.push(format!("{r}.crt"));
        names.push(format!("{r}.key"));
    }
    if !force {
        let present: Vec<&String> = names.iter().filter(|n| dir.join(n).exists()).collect();
        if !present.is_empty() {
            bail!(
                "{} already holds {} (and maybe more); pass --force to replace them",
                dir.display(),
                present
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let mut files = Vec::new();
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "ril run CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA")?;
    let issuer = Issuer::new(ca, &ca_key);
    write(&dir.join("ca.crt"), ca_cert.pem().as_bytes(), false)?;
    write(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes(), true)?;
    files.push(dir.join("ca.crt"));
    files.push(dir.join("ca.key"));
    for role in Role::ALL {
        let key = KeyPair::generate().with_context(|| format!("generating the {role} key"))?;
        let mut p = CertificateParams::new(role_sans(role, namespace, extra_sans))
            .with_context(|| format!("the {role} certificate's names"))?;
        p.subject_alt_names
            .push(SanType::URI(role.uri().try_into()?));
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
            .signed_by(&key, &issuer)
            .with_context(|| format!("signing the {role} certificate"))?;
        let (c, k) = (
            dir.join(format!("{role}.crt")),
            dir.join(format!("{role}.key")),
        );
        write(&c, cert.pem().as_bytes(), false)?;
        write(&k, key.serialize_pem().as_bytes(), true)?;
        files.push(c);
        files.push(k);
    }
    let token = dir.join("token");
    write(&token, format!("{}\n", new_token()).as_bytes(), true)?;
    files.push(token);
    Ok(Written { files })
}

/// The Secrets for `dir` as a Kubernetes `v1/List` (JSON, which `kubectl apply -f -` reads).
pub fn secrets_list(dir: &Path, namespace: &str) -> anyhow::Result<serde_json::Value> {
    use base64::Engine as _;
    let read = |name: &str| -> anyhow::Result<String> {
        let p = dir.join(name);
        let bytes = std::fs::read(&p).with_context(|| {
            format!(
                "reading {} (make the directory with `ril certs init {}`)",
                p.display(),
                dir.display()
            )
        })?;
        Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
    };
    let secret = |name: String, component: &str, data: serde_json::Value| {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {
                    "app.kubernetes.io/part-of": "ril",
                    "app.kubernetes.io/component": component,
                },
            },
            "data": data,
        })
    };
    let mut items = vec![secret(
        TOKEN_SECRET.into(),
        "run-token",
        serde_json::json!({ "token": read("token")? }),
    )];
    for role in Role::ALL {
        let (crt, key) = (format!("{role}.crt"), format!("{role}.key"));
        let mut data = serde_json::Map::new();
        data.insert("ca.crt".into(), read("ca.crt")?.into());
        data.insert(crt.clone(), read(&crt)?.into());
        data.insert(key.clone(), read(&key)?.into());
        items.push(secret(tls_secret(role), role.as_str(), data.into()));
    }
    Ok(serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": items }))
}

pub fn secrets(a: &CertsSecretsArgs) -> anyhow::Result<()> {
    let list = secrets_list(&a.dir, &a.namespace)?;
    println!("{}", serde_json::to_string_pretty(&list)?);
    Ok(())
}

pub fn init(a: &CertsInitArgs) -> anyhow::Result<()> {
    let w = generate(&a.dir, &a.sans, &a.namespace, a.force)?;
    for f in &w.files {
        println!("wrote {}", f.display());
    }
    println!(
        "keep ca.key offline: servers and clients need only ca.crt, their role's .crt/.key and \
         the token; for Kubernetes: `ril certs secrets DIR | kubectl apply -f -` (deploy/README.md)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn secrets_hold_each_role_s_own_files_the_token_and_never_the_ca_key() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &[], "ril", false).unwrap();
        let list = secrets_list(dir.path(), "team-a").unwrap();
        assert_eq!(list["kind"], "List");
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 1 + Role::ALL.len());
        let decode = |v: &serde_json::Value| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap())
                .unwrap()
        };
        let token = &items[0];
        assert_eq!(token["metadata"]["name"], TOKEN_SECRET);
        assert_eq!(token["metadata"]["namespace"], "team-a");
        assert_eq!(
            decode(&token["data"]["token"]),
            std::fs::read(dir.path().join("token")).unwrap()
        );
        for (role, s) in Role::ALL.iter().zip(&items[1..]) {
            assert_eq!(s["kind"], "Secret");
            assert_eq!(s["metadata"]["name"], tls_secret(*role));
            let data = s["data"].as_object().unwrap();
            let mut keys: Vec<&str> = data.keys().map(String::as_str).collect();
            keys.sort();
            let (crt, key) = (format!("{role}.crt"), format!("{role}.key"));
            let mut want = vec!["ca.crt", crt.as_str(), key.as_str()];
            want.sort();
            assert_eq!(keys, want, "{role}");
            for k in keys {
                assert_eq!(
                    decode(&data[k]),
                    std::fs::read(dir.path().join(k)).unwrap(),
                    "{role}: {k}"
                );
            }
        }
        let text = serde_json::to_string(&list).unwrap();
        let ca_key = base64::engine::general_purpose::STANDARD
            .encode(std::fs::read(dir.path().join("ca.key")).unwrap());
        assert!(!text.contains(&ca_key), "the CA key is in a Secret");
    }

    #[test]
    fn secrets_from_a_directory_without_certificates_name_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = format!("{:#}", secrets_list(dir.path(), "ril").unwrap_err());
        assert!(e.contains("token") && e.contains("ril certs init"), "{e}");
    }
}
