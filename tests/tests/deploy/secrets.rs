//! Secrets: API keys and the run's certificates and token come from Secrets, never from
//! ConfigMaps or git, and every pod mounts only its own role's key.

use std::collections::BTreeSet;

use ril_tests::k8s::*;
use ril_tests::{Sandbox, need_kubectl};

use crate::kubelet::{SECRETS_MOUNT, make_secrets, mount_secrets, security_role};

#[test]
fn api_keys_come_from_secrets_never_from_config_maps() {
    need_kubectl!();
    let secretish = |n: &str| {
        let n = n.to_ascii_uppercase();
        ["KEY", "TOKEN", "SECRET", "PASSWORD"]
            .iter()
            .any(|s| n.contains(s))
    };
    let mut checked_key_vars = 0;
    for r in all_renderings() {
        // Keys are created out of band (`kubectl create secret`), never rendered from git.
        assert_eq!(
            r.of_kind("Secret").count(),
            0,
            "{}: a Secret with its values in the repository",
            r.name
        );
        for cm in r.of_kind("ConfigMap") {
            for (k, v) in cm["data"].as_object().into_iter().flatten() {
                let text = v.as_str().unwrap_or("");
                for line in text.lines() {
                    let line = line.trim_start();
                    assert!(
                        !(line.starts_with("api_key ") || line.starts_with("api_key=")),
                        "{}: ConfigMap {} key {k} holds an API key: {line}",
                        r.name,
                        name(cm)
                    );
                    assert!(
                        !line.contains("Bearer ") && !line.contains("sk-"),
                        "{}: ConfigMap {} key {k}: {line}",
                        r.name,
                        name(cm)
                    );
                }
            }
        }
        let (_, config) = r.run_config();
        for w in r.workloads() {
            for c in w.containers().into_iter().chain(w.init_containers()) {
                for e in c["env"].as_array().into_iter().flatten() {
                    let var = e["name"].as_str().unwrap();
                    if secretish(var) {
                        assert!(
                            e["value"].is_null() && e["valueFrom"]["secretKeyRef"].is_object(),
                            "{}: {} sets {var} other than from a Secret",
                            r.name,
                            w.name()
                        );
                    }
                }
                // Each variable ril is told to read a key from is filled from a Secret.
                let a = args(c);
                let mut key_vars = Vec::new();
                if let Some(v) = flag(&a, "--judge-api-key-env") {
                    key_vars.push(v);
                }
                if subcommand(c) == "teacher" {
                    let teacher = flag(&a, "--name").unwrap();
                    let entry = config["teachers"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|t| t["name"].as_str() == Some(&teacher))
                        .unwrap();
                    if let Some(v) = entry.get("api_key_env").and_then(|v| v.as_str()) {
                        key_vars.push(v.to_string());
                    }
                }
                for var in key_vars {
                    let e = env_value(c, &var).unwrap_or_else(|| {
                        panic!(
                            "{}: {} reads its key from {var}, which it lacks",
                            r.name,
                            w.name()
                        )
                    });
                    assert!(e["valueFrom"]["secretKeyRef"]["name"].is_string());
                    checked_key_vars += 1;
                }
            }
        }
    }
    assert!(
        checked_key_vars >= 2,
        "the vLLM example's teacher and judge keys come from the Secret"
    );
}

/// The manifests mount, in every pod, exactly the Secrets its run config's `[security]` reads:
/// its own role's certificate and key (and no other role's), the CA certificate and the run
/// token, from the Secrets `ril certs secrets` makes; the CA's key is in none of them. Nothing
/// runs with security off.
#[test]
fn every_pod_mounts_its_own_role_s_certificate_and_the_run_token_from_secrets() {
    need_kubectl!();
    let sb = Sandbox::new();
    let secrets = make_secrets(&sb);
    for s in &secrets {
        assert_eq!(s["kind"], "Secret");
        assert!(
            !s["data"].as_object().unwrap().contains_key("ca.key"),
            "{}: the CA key must stay offline",
            name(s)
        );
    }
    for r in all_renderings() {
        let (_, config) = r.run_config();
        let sec = config
            .get("security")
            .and_then(|s| s.as_table())
            .unwrap_or_else(|| panic!("{}: run.toml has no [security]", r.name));
        assert!(
            !sec.get("allow_insecure")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            "{}: security is off",
            r.name
        );
        assert_ne!(
            sec.get("mtls").and_then(|v| v.as_bool()),
            Some(false),
            "{}",
            r.name
        );
        for w in r.workloads() {
            let c = w.containers()[0];
            let role = security_role(c);
            let pod = sb.path(&format!("pods/{}-{}", r.name.replace('/', "-"), w.name()));
            mount_secrets(w, &secrets, &pod);
            // Only this role's certificate: a pod holds no other role's key.
            let mut keys = BTreeSet::new();
            for f in std::fs::read_dir(pod.join("tls")).unwrap() {
                keys.insert(f.unwrap().file_name().to_string_lossy().into_owned());
            }
            let expected: BTreeSet<String> = [
                "ca.crt".to_string(),
                format!("{role}.crt"),
                format!("{role}.key"),
            ]
            .into();
            assert_eq!(keys, expected, "{}: {}'s tls mount", r.name, w.name());
            for key in ["token_file", "ca", "cert", "key"] {
                let path = sec
                    .get(key)
                    .and_then(|v| v.as_str())
                    .unwrap_or_else(|| panic!("{}: [security] {key} unset", r.name))
                    .replace("{role}", role);
                let below = path.strip_prefix(SECRETS_MOUNT).unwrap_or_else(|| {
                    panic!(
                        "{}: [security] {key} = {path} is not under {SECRETS_MOUNT}",
                        r.name
                    )
                });
                assert!(
                    pod.join(below.trim_start_matches('/')).is_file(),
                    "{}: {} reads {path} ([security] {key}), which no Secret mount provides",
                    r.name,
                    w.name()
                );
            }
            // The Secrets' files are readable by the pod's user through fsGroup, by no one else.
            for m in c["volumeMounts"].as_array().unwrap() {
                if m["mountPath"].as_str().unwrap().starts_with(SECRETS_MOUNT) {
                    assert_eq!(m["readOnly"], true, "{}: {}", r.name, w.name());
                    let v = w.volume(m["name"].as_str().unwrap());
                    assert_eq!(
                        v["secret"]["defaultMode"].as_u64(),
                        Some(0o440),
                        "{}: {}",
                        r.name,
                        w.name()
                    );
                }
            }
        }
    }
}
