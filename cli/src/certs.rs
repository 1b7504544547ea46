//! `ril certs init DIR` (a run CA, one certificate and key per role, and a run token: what
//! `ril_orchestrate::certs::generate` writes, which the local cluster also calls for every run)
//! and `ril certs secrets DIR`, the same files as the Kubernetes Secrets the manifests mount
//! (deploy/README.md).

use std::path::{Path, PathBuf};

use anyhow::Context;
use ril_orchestrate::certs::generate;
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
