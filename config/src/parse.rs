//! Reading a run config, step by step: the TOML table and its sections, the run-level sections
//! (paths resolved against the config's directory), then each role section with the run-level
//! keys filled in. [`crate::write`] is the same steps backwards.

use std::path::{Path, PathBuf};

use toml::Value;

use crate::error::ConfigError;
use crate::sections::{DataSection, NetworkSection, RolloutSection, RunSection, StudentSection};
use crate::{RunConfig, TOP_LEVEL};

/// The sections a run config cannot do without.
const REQUIRED: [&str; 4] = ["run", "data", "student", "rollout"];

/// A teacher's file paths (an OpenAI `model` is a model name, not a path).
pub(crate) const TEACHER_PATH_KEYS: [&str; 4] = ["checkpoint", "dataset", "answers", "cache"];

/// A run-level value filled into a role section: the key there, the value, and where it is
/// written once (`[run] seed`).
pub(crate) struct Injection {
    pub key: &'static str,
    pub value: Value,
    pub from: &'static str,
}

pub(crate) fn path_value(p: &Path) -> Value {
    Value::String(p.to_string_lossy().into_owned())
}

/// `p` relative to the config file's directory `base` (absolute paths stay as they are).
pub(crate) fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// The directory relative paths in the config at `path` are relative to.
pub(crate) fn config_dir(path: &Path) -> PathBuf {
    path.parent().unwrap_or(Path::new(".")).to_path_buf()
}

/// The keys `[learner]` takes from the run-level sections.
pub(crate) fn learner_injections(
    run: &RunSection,
    student: &StudentSection,
    network: &NetworkSection,
) -> Vec<Injection> {
    let int = |x: u64| Value::Integer(x as i64);
    vec![
        Injection {
            key: "init_checkpoint",
            value: path_value(&student.checkpoint),
            from: "[student] checkpoint",
        },
        Injection {
            key: "out_dir",
            value: path_value(&run.dir.join("learner")),
            from: "[run] dir",
        },
        Injection {
            key: "questions_per_iteration",
            value: int(run.questions_per_iteration),
            from: "[run] questions_per_iteration",
        },
        Injection {
            key: "total_iterations",
            value: int(run.iterations),
            from: "[run] iterations",
        },
        Injection {
            key: "staleness_bound",
            value: int(run.staleness_bound),
            from: "[run] staleness_bound",
        },
        Injection {
            key: "seed",
            value: int(run.seed),
            from: "[run] seed",
        },
        Injection {
            key: "coordinator_addr",
            value: Value::String(network.coordinator.clone().unwrap_or_default()),
            from: "[network] coordinator",
        },
    ]
}

/// The keys `[discriminator]` takes from the run-level sections (`init` is a default, not an
/// injection: a pre-trained D may start elsewhere).
pub(crate) fn discriminator_injections(run: &RunSection) -> Vec<Injection> {
    vec![Injection {
        key: "checkpoint_dir",
        value: path_value(&run.dir.join("discriminator")),
        from: "[run] dir",
    }]
}

/// The role sections that take `[run] device` when they name no device of their own.
pub(crate) const DEVICE_SECTIONS: [&str; 3] = ["actors", "learner", "discriminator"];

/// Whether a `[[teachers]]` entry has a `device` key (only the candle backend runs a model).
pub(crate) fn teacher_has_device(t: &toml::Table) -> bool {
    t.get("backend").and_then(Value::as_str) == Some("candle")
}

/// `[run] device` filled into every role section (and candle teacher) without its own
/// `device`. A default, not an injection: a role may name another device (the learner on one
/// GPU, the actors on another).
fn fill_run_device(path: &Path, table: &mut toml::Table, device: &str) -> Result<(), ConfigError> {
    let fill = |t: &mut toml::Table| {
        t.entry("device")
            .or_insert_with(|| Value::String(device.to_string()));
    };
    for name in DEVICE_SECTIONS {
        let mut t = take_table(path, table, name)?;
        fill(&mut t);
        table.insert(name.into(), Value::Table(t));
    }
    if let Some(Value::Array(entries)) = table.get_mut("teachers") {
        for entry in entries {
            match entry {
                Value::Table(t) if teacher_has_device(t) => fill(t),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Where a teacher's answer cache goes unless its entry names one.
pub(crate) fn default_teacher_cache(run: &RunSection, name: &str) -> PathBuf {
    run.dir.join("teachers").join(format!("{name}.redb"))
}

/// Puts each injection into `table` unless present; a present, different value is refused.
fn inject(
    path: &Path,
    table: &mut toml::Table,
    section: &'static str,
    injections: Vec<Injection>,
) -> Result<(), ConfigError> {
    for Injection { key, value, from } in injections {
        match table.get(key) {
            None => {
                table.insert(key.to_string(), value);
            }
            Some(v) if *v == value => {}
            Some(v) => {
                return Err(ConfigError::Contradiction {
                    path: path.to_path_buf(),
                    section,
                    key,
                    value: v.to_string(),
                    from,
                    run_value: value.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// The text as a TOML table with known sections only, the required ones present.
pub(crate) fn read_table(text: &str, path: &Path) -> Result<toml::Table, ConfigError> {
    let table: toml::Table = text.parse().map_err(|error| ConfigError::NotToml {
        path: path.to_path_buf(),
        error: Box::new(error),
    })?;
    if let Some(key) = table.keys().find(|k| !TOP_LEVEL.contains(&k.as_str())) {
        return Err(ConfigError::UnknownSection {
            path: path.to_path_buf(),
            key: key.clone(),
        });
    }
    if let Some(section) = REQUIRED.into_iter().find(|s| !table.contains_key(*s)) {
        return Err(ConfigError::MissingSection {
            path: path.to_path_buf(),
            section,
        });
    }
    Ok(table)
}

fn section<T: serde::de::DeserializeOwned>(
    path: &Path,
    table: &toml::Table,
    name: &'static str,
) -> Result<Option<T>, ConfigError> {
    match table.get(name) {
        None => Ok(None),
        Some(v) => v
            .clone()
            .try_into()
            .map(Some)
            .map_err(|error| ConfigError::Section {
                path: path.to_path_buf(),
                section: name,
                error: Box::new(error),
            }),
    }
}

fn required<T: serde::de::DeserializeOwned>(
    path: &Path,
    table: &toml::Table,
    name: &'static str,
) -> Result<T, ConfigError> {
    section(path, table, name)?.ok_or_else(|| ConfigError::MissingSection {
        path: path.to_path_buf(),
        section: name,
    })
}

/// `[security]`'s file paths.
pub(crate) fn security_paths(
    security: &mut ril_proto::security::SecurityConfig,
) -> impl Iterator<Item = &mut PathBuf> {
    [
        &mut security.token_file,
        &mut security.ca,
        &mut security.cert,
        &mut security.key,
    ]
    .into_iter()
    .flatten()
}

/// Takes the role section `name` out of `table` (an empty table when absent).
fn take_table(
    path: &Path,
    table: &mut toml::Table,
    name: &'static str,
) -> Result<toml::Table, ConfigError> {
    match table.remove(name) {
        Some(Value::Table(t)) => Ok(t),
        None => Ok(toml::Table::new()),
        Some(_) => Err(ConfigError::NotATable {
            path: path.to_path_buf(),
            section: name,
        }),
    }
}

/// Replaces a relative path at `key` with its resolved form.
fn resolve_key(table: &mut toml::Table, key: &str, base: &Path) {
    if let Some(Value::String(p)) = table.get(key).cloned() {
        table.insert(key.into(), path_value(&resolve(base, Path::new(&p))));
    }
}

/// `[learner]`, the run-level keys filled in.
/// The sections the role sections are filled from.
struct RunLevel<'a> {
    run: &'a RunSection,
    student: &'a StudentSection,
    network: &'a NetworkSection,
    rollout: &'a RolloutSection,
}

fn learner(
    path: &Path,
    table: &mut toml::Table,
    base: &Path,
    cfg: &RunLevel<'_>,
) -> Result<ril_learner::LearnerOptions, ConfigError> {
    let mut t = take_table(path, table, "learner")?;
    let injections = learner_injections(cfg.run, cfg.student, cfg.network);
    inject(path, &mut t, "learner", injections)?;
    resolve_key(&mut t, "reference_checkpoint", base);
    let mut learner: ril_learner::LearnerOptions =
        Value::Table(t)
            .try_into()
            .map_err(|error| ConfigError::Section {
                path: path.to_path_buf(),
                section: "learner",
                error: Box::new(error),
            })?;
    if learner.grpo.loss_normalizer == 0 {
        learner.grpo.loss_normalizer = cfg.rollout.max_new_tokens as usize;
    }
    Ok(learner)
}

/// `[discriminator]`: D starts from the student unless `init` says otherwise; checkpoints under
/// the run dir.
fn discriminator(
    path: &Path,
    table: &mut toml::Table,
    base: &Path,
    cfg: &RunLevel<'_>,
) -> Result<ril_discriminator::DiscriminatorOptions, ConfigError> {
    let mut t = take_table(path, table, "discriminator")?;
    resolve_key(&mut t, "init", base);
    if !matches!(t.get("init"), Some(Value::String(_))) {
        t.insert("init".into(), path_value(&cfg.student.checkpoint));
    }
    inject(
        path,
        &mut t,
        "discriminator",
        discriminator_injections(cfg.run),
    )?;
    Value::Table(t)
        .try_into()
        .map_err(|error| ConfigError::Section {
            path: path.to_path_buf(),
            section: "discriminator",
            error: Box::new(error),
        })
}

/// `[[teachers]]`: caches under the run dir, file paths relative to the config.
fn teachers(
    path: &Path,
    table: &mut toml::Table,
    base: &Path,
    cfg: &RunLevel<'_>,
) -> Result<Vec<ril_teacher::TeacherOptions>, ConfigError> {
    let entries = match table.remove("teachers") {
        Some(Value::Array(a)) => a,
        None => Vec::new(),
        Some(_) => {
            return Err(ConfigError::TeachersNotAnArray {
                path: path.to_path_buf(),
            });
        }
    };
    let mut teachers = Vec::new();
    for (index, v) in entries.into_iter().enumerate() {
        let Value::Table(mut t) = v else {
            return Err(ConfigError::TeacherNotATable {
                path: path.to_path_buf(),
                index,
            });
        };
        let name = t
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ConfigError::TeacherWithoutName {
                path: path.to_path_buf(),
                index,
            })?;
        for key in TEACHER_PATH_KEYS {
            resolve_key(&mut t, key, base);
        }
        if !t.contains_key("cache") {
            let cache = default_teacher_cache(cfg.run, &name);
            t.insert("cache".into(), path_value(&cache));
        }
        let options = Value::Table(t)
            .try_into()
            .map_err(|error| ConfigError::Teacher {
                path: path.to_path_buf(),
                index,
                name,
                error: Box::new(error),
            })?;
        teachers.push(options);
    }
    Ok(teachers)
}

impl RunConfig {
    /// Every section typed, the run-level keys filled into the role sections; not validated.
    /// The run-level sections are read first (paths resolved against the config's directory),
    /// then each role section from them.
    pub(crate) fn from_table(mut table: toml::Table, path: &Path) -> Result<Self, ConfigError> {
        let base = config_dir(path);
        let mut run: RunSection = required(path, &table, "run")?;
        run.dir = resolve(&base, &run.dir);
        let mut data: DataSection = required(path, &table, "data")?;
        data.path = resolve(&base, &data.path);
        let mut student: StudentSection = required(path, &table, "student")?;
        student.checkpoint = resolve(&base, &student.checkpoint);
        let rollout: RolloutSection = required(path, &table, "rollout")?;
        if let Some(device) = &run.device {
            fill_run_device(path, &mut table, device)?;
        }
        let network = section(path, &table, "network")?.unwrap_or_default();
        let coordinator = section(path, &table, "coordinator")?.unwrap_or_default();
        let actors = section(path, &table, "actors")?.unwrap_or_default();
        let mut security: ril_proto::security::SecurityConfig =
            section(path, &table, "security")?.unwrap_or_default();
        for p in security_paths(&mut security) {
            *p = resolve(&base, p);
        }
        let level = RunLevel {
            run: &run,
            student: &student,
            network: &network,
            rollout: &rollout,
        };
        let learner = learner(path, &mut table, &base, &level)?;
        let discriminator = discriminator(path, &mut table, &base, &level)?;
        let teachers = teachers(path, &mut table, &base, &level)?;
        Ok(Self {
            path: path.to_path_buf(),
            run,
            data,
            student,
            rollout,
            network,
            coordinator,
            actors,
            learner,
            discriminator,
            teachers,
            security,
        })
    }
}
