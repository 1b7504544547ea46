//! The binary accepts what the manifests run: every command line, every rendered run config.

use std::collections::BTreeMap;
use std::process::Command;

use ril_tests::k8s::*;
use ril_tests::{Sandbox, need_kubectl, ril_binary, stderr, stdout};

use crate::kubelet::{every_role_s_secrets, localise, make_assets};

/// Every subcommand and flag a manifest passes exists in this `ril`.
#[test]
fn every_command_line_in_the_manifests_is_one_ril_accepts() {
    need_kubectl!();
    let mut help: BTreeMap<String, String> = BTreeMap::new();
    for r in all_renderings() {
        for w in r.workloads() {
            for c in w.containers().into_iter().chain(w.init_containers()) {
                let sub = subcommand(c);
                let text = help.entry(sub.clone()).or_insert_with(|| {
                    let mut cmd = Command::new(ril_binary());
                    cmd.args(sub.split(' ')).arg("--help");
                    let out = cmd.output().unwrap();
                    assert!(out.status.success(), "ril {sub} --help: {}", stderr(&out));
                    stdout(&out)
                });
                for a in args(c).iter().filter(|a| a.starts_with("--")) {
                    assert!(
                        text.contains(&format!("{a} ")) || text.contains(&format!("{a}\n")),
                        "{}: {}: `ril {sub}` has no flag {a}",
                        r.name,
                        w.name()
                    );
                }
            }
        }
    }
}

#[test]
fn every_rendered_run_config_passes_ril_config_check() {
    need_kubectl!();
    let sb = Sandbox::new();
    let local = render("overlays/local");
    let assets = make_assets(&sb, &local);
    let secrets = every_role_s_secrets(&sb);
    let env = sb.ril(&["env"]);
    let features = stdout(&env);
    for r in all_renderings() {
        let (text, _) = r.run_config();
        let file = sb.path(&format!("{}.toml", r.name.replace('/', "-")));
        std::fs::write(&file, localise(&text, &assets, &sb.path("run"), &secrets)).unwrap();
        let out = sb.ril(&["config", "check", &file.to_string_lossy()]);
        if out.status.success() {
            assert!(stdout(&out).contains(": ok"), "{}", stdout(&out));
            continue;
        }
        // A GPU config needs a GPU build (deploy/Dockerfile.cuda). Without one, the refusal
        // must be that, and the config must pass with the CPU equivalents.
        let e = stderr(&out);
        assert!(
            features.contains("nccl=false") || features.contains("cuda=false"),
            "{}: {e}",
            r.name
        );
        assert!(
            e.contains("needs a build with `--features nccl`")
                || e.contains("rebuild with `--features cuda`"),
            "{}: {e}",
            r.name
        );
        let cpu = localise(&text, &assets, &sb.path("run"), &secrets)
            .replace("collective = \"nccl\"", "collective = \"ring\"")
            .replace("device = \"cuda:0\"", "device = \"cpu\"");
        std::fs::write(&file, cpu).unwrap();
        let out = sb.ril(&["config", "check", &file.to_string_lossy()]);
        assert!(
            out.status.success(),
            "{} (with CPU devices): {}",
            r.name,
            stderr(&out)
        );
        eprintln!(
            "{}: checked with the ring collective and CPU devices (this ril has {})",
            r.name,
            features
                .lines()
                .find(|l| l.starts_with("features"))
                .unwrap_or("")
        );
    }
}
