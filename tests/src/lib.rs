//! Helpers for the integration tests: run the real `ril` binary in a scratch directory, and
//! read the Kubernetes deployment as objects ([`k8s`]).
//!
//! The binary is the one cargo builds next to the test executables (`target/<profile>/ril`;
//! `cargo test --workspace` builds it because the `ril-cli` package has integration tests), or
//! the one named by `RIL_BIN`.

pub mod k8s;
pub mod roles;
pub mod scrape;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Fails a test, saying why, when kubectl is absent: it renders the manifests, and a deploy
/// test that passed without them would prove nothing.
#[macro_export]
macro_rules! need_kubectl {
    () => {
        assert!(
            $crate::k8s::kubectl_present(),
            "kubectl is not on PATH: the deploy tests render deploy/k8s with `kubectl kustomize` \
             (the machine image has it; elsewhere install kubectl v1.32 or newer)"
        );
    };
}

/// Path of the `ril` binary under test.
pub fn ril_binary() -> PathBuf {
    if let Ok(p) = std::env::var("RIL_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/ril
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join(format!("ril{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} not found: build it first (`cargo build -p ril-cli`) or set RIL_BIN",
        bin.display()
    );
    bin
}

/// A scratch directory and the binary, for one test.
#[derive(Debug)]
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs `ril ARGS` in the sandbox with one candle thread (tests share the cores).
    pub fn ril(&self, args: &[&str]) -> Output {
        Command::new(ril_binary())
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .env("CANDLE_NUM_THREADS", "1")
            .output()
            .expect("the ril binary runs")
    }

    /// A tiny run's inputs made with ril's own commands: a shapes dataset in `data/`
    /// (`n_train` rows, 32-pixel images, at most 2 objects, seed 5), a 300-token tokenizer in
    /// `tok/`, and one random test-size model (one decoder layer) per `(directory, seed)`.
    pub fn make_tiny_run(&self, n_train: usize, models: &[(&str, &str)]) {
        let n = n_train.to_string();
        let held_out = (n_train / 6).max(2).to_string();
        ok(&self.ril(&[
            "data",
            "synth",
            "--out",
            "data",
            "--seed",
            "5",
            "--n-train",
            &n,
            "--n-val",
            &held_out,
            "--n-test",
            &held_out,
            "--image-size",
            "32",
            "--max-objects",
            "2",
        ]));
        ok(&self.ril(&[
            "tokenizer",
            "train",
            "--data",
            "data",
            "--out",
            "tok",
            "--vocab-size",
            "300",
        ]));
        for (name, seed) in models {
            ok(&self.ril(&[
                "model",
                "init",
                "--tokenizer",
                "tok",
                "--size",
                "test",
                "--layers",
                "1",
                "--seed",
                seed,
                "--out",
                name,
            ]));
        }
    }
}

/// Asserts that a `ril` run succeeded, showing its output when it did not.
pub fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        stdout(out),
        stderr(out)
    );
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
