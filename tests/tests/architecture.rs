//! The dependency rules of ARCHITECTURE.md, read from the workspace's own Cargo.toml files so
//! they cannot rot: a crate added to the workspace must be given a floor here, and a dependency
//! that breaks a rule fails this test with the crate and the path that breaks it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every workspace crate (by directory) and its floor. A crate may depend only on crates of a
/// lower floor; crates on the roles' floor may not depend on one another.
const FLOORS: &[(&str, u32)] = &[
    ("common", 0),
    ("data", 1),
    ("model", 1),
    ("plot", 1),
    ("prompt", 2),
    ("proto", 2),
    ("openai", 2),
    // The roles.
    ("actor", 3),
    ("coordinator", 3),
    ("discriminator", 3),
    ("learner", 3),
    ("teacher", 3),
    // Above the roles: the run config, the orchestration (local cluster, demo, experiments),
    // the binary, and what tests and fuzzes the whole.
    ("config", 4),
    ("orchestrate", 5),
    ("cli", 6),
    ("tests", 7),
    ("fuzz", 7),
];

const ROLE_FLOOR: u32 = 3;

/// Crates that must never depend on these, directly or through another crate.
const NEVER: &[(&str, &str, &str)] = &[
    (
        "actor",
        "learner",
        "actors never depend on the learner (DESIGN.md): it would bring the trainer, the ring and NCCL",
    ),
    (
        "teacher",
        "learner",
        "a teacher server never depends on the learner",
    ),
    ("data", "model", "the data layer has no model code"),
    ("model", "proto", "the model knows nothing of gRPC"),
];

/// Outside crates a floor-0/1/2 crate must not use (the model and data layers have no async
/// runtime and no gRPC). `ril-common` may use tokio only as an optional feature.
const NO_RUNTIME: &[&str] = &["common", "data", "model", "plot", "prompt"];
const RUNTIME_CRATES: &[&str] = &["tokio", "tonic", "tonic-prost", "prost", "tonic-health"];

struct Manifest {
    /// Internal dependencies (normal and build; dev-dependencies do not ship).
    internal: BTreeSet<String>,
    /// Outside dependencies that are not optional.
    external: BTreeSet<String>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read_toml(path: &Path) -> toml::Table {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("{}: not TOML: {e}", path.display()))
}

/// Workspace crate directory -> package name, from the root manifest's members.
fn members() -> BTreeMap<String, String> {
    let root_toml = read_toml(&root().join("Cargo.toml"));
    let members = root_toml["workspace"]["members"].as_array().unwrap();
    members
        .iter()
        .map(|m| {
            let dir = m.as_str().unwrap().to_string();
            let manifest = read_toml(&root().join(&dir).join("Cargo.toml"));
            let name = manifest["package"]["name"].as_str().unwrap().to_string();
            (dir, name)
        })
        .collect()
}

fn manifest(dir: &str, names: &BTreeMap<String, String>) -> Manifest {
    let by_name: BTreeMap<&str, &str> = names
        .iter()
        .map(|(d, n)| (n.as_str(), d.as_str()))
        .collect();
    let t = read_toml(&root().join(dir).join("Cargo.toml"));
    let mut internal = BTreeSet::new();
    let mut external = BTreeSet::new();
    for section in ["dependencies", "build-dependencies"] {
        let Some(deps) = t.get(section).and_then(|d| d.as_table()) else {
            continue;
        };
        for (name, spec) in deps {
            let optional = spec
                .as_table()
                .and_then(|s| s.get("optional"))
                .and_then(|o| o.as_bool())
                .unwrap_or(false);
            match by_name.get(name.as_str()) {
                Some(d) => {
                    internal.insert(d.to_string());
                }
                None if !optional => {
                    external.insert(name.clone());
                }
                None => {}
            }
        }
    }
    Manifest { internal, external }
}

fn graph() -> BTreeMap<String, Manifest> {
    let names = members();
    names
        .keys()
        .map(|dir| (dir.clone(), manifest(dir, &names)))
        .collect()
}

/// A path of dependencies from `from` to `to`, if any.
fn path_between(g: &BTreeMap<String, Manifest>, from: &str, to: &str) -> Option<Vec<String>> {
    let mut stack = vec![vec![from.to_string()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().unwrap().clone();
        if last == to && path.len() > 1 {
            return Some(path);
        }
        if !seen.insert(last.clone()) {
            continue;
        }
        for next in &g[&last].internal {
            let mut p = path.clone();
            p.push(next.clone());
            stack.push(p);
        }
    }
    None
}

#[test]
fn every_workspace_crate_has_a_floor() {
    let floors: BTreeMap<&str, u32> = FLOORS.iter().copied().collect();
    let missing: Vec<String> = members()
        .keys()
        .filter(|d| !floors.contains_key(d.as_str()))
        .cloned()
        .collect();
    assert!(
        missing.is_empty(),
        "crates without a floor in tests/tests/architecture.rs (and ARCHITECTURE.md): {missing:?}"
    );
}

#[test]
fn dependencies_run_down_the_floors_and_roles_stand_apart() {
    let floors: BTreeMap<&str, u32> = FLOORS.iter().copied().collect();
    let g = graph();
    let mut broken = Vec::new();
    for (dir, m) in &g {
        let Some(&floor) = floors.get(dir.as_str()) else {
            continue;
        };
        for dep in &m.internal {
            let dep_floor = floors[dep.as_str()];
            if dep_floor > floor || (dep_floor == floor && floor != ROLE_FLOOR) {
                broken.push(format!(
                    "{dir} (floor {floor}) depends on {dep} (floor {dep_floor})"
                ));
            } else if dep_floor == floor {
                broken.push(format!(
                    "role {dir} depends on role {dep}: roles talk over gRPC only"
                ));
            }
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}

#[test]
fn the_actor_and_the_teacher_never_depend_on_the_learner() {
    let g = graph();
    for (from, to, why) in NEVER {
        if let Some(path) = path_between(&g, from, to) {
            panic!("{} ({why})", path.join(" -> "));
        }
    }
}

#[test]
fn the_model_and_data_layers_have_no_async_runtime_or_grpc() {
    let g = graph();
    for dir in NO_RUNTIME {
        let m = &g[*dir];
        let used: Vec<&String> = m
            .external
            .iter()
            .filter(|e| RUNTIME_CRATES.contains(&e.as_str()))
            .collect();
        assert!(used.is_empty(), "{dir} depends on {used:?}");
    }
}

/// The checker itself: a rule it cannot see broken proves nothing.
#[test]
fn the_checker_finds_a_path_it_is_shown() {
    let mut g = BTreeMap::new();
    let m = |deps: &[&str]| Manifest {
        internal: deps.iter().map(|d| d.to_string()).collect(),
        external: BTreeSet::new(),
    };
    g.insert("actor".to_string(), m(&["prompt"]));
    g.insert("prompt".to_string(), m(&["learner"]));
    g.insert("learner".to_string(), m(&[]));
    assert_eq!(
        path_between(&g, "actor", "learner").unwrap(),
        ["actor", "prompt", "learner"]
    );
    assert!(path_between(&g, "learner", "actor").is_none());
}
