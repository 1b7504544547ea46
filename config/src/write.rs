//! Writing a run config back as the TOML file that reads back to it: [`crate::parse`]'s steps
//! backwards. Run-level keys appear once, in their own sections (a role section's copy that
//! equals what parsing would fill in is left out), and paths under the config's directory are
//! written relative to it, as parsing resolves them.

use std::path::{Path, PathBuf};

use serde::Serialize;
use toml::Value;

use crate::RunConfig;
use crate::error::ConfigError;
use crate::parse::{
    Injection, TEACHER_PATH_KEYS, config_dir, default_teacher_cache, discriminator_injections,
    learner_injections, path_value, security_paths, teacher_has_device,
};
use crate::sections::{ActorsSection, CoordinatorSection, NetworkSection};

/// The paths of the role sections that parsing resolves against the config's directory.
const LEARNER_PATH_KEYS: [&str; 3] = ["init_checkpoint", "reference_checkpoint", "out_dir"];
const DISCRIMINATOR_PATH_KEYS: [&str; 2] = ["init", "checkpoint_dir"];

/// `p` as written in a config file in `base`: relative when it lies under `base`.
fn relative(base: &Path, p: &Path) -> PathBuf {
    if base.as_os_str().is_empty() {
        return p.to_path_buf();
    }
    match p.strip_prefix(base) {
        Ok(rel) if rel.as_os_str().is_empty() => PathBuf::from("."),
        Ok(rel) => rel.to_path_buf(),
        Err(_) => p.to_path_buf(),
    }
}

fn relative_keys(table: &mut toml::Table, keys: &[&str], base: &Path) {
    for key in keys {
        if let Some(Value::String(p)) = table.get(*key) {
            let rel = relative(base, Path::new(p));
            table.insert(key.to_string(), path_value(&rel));
        }
    }
}

/// Leaves out the keys whose value is the one parsing fills in.
fn strip(table: &mut toml::Table, injections: Vec<Injection>) {
    for Injection { key, value, .. } in injections {
        if table.get(key) == Some(&value) {
            table.remove(key);
        }
    }
}

impl RunConfig {
    /// Leaves out a role's `device` when it is `[run] device`, which parsing fills in.
    fn strip_run_device(&self, table: &mut toml::Table) {
        let Some(device) = &self.run.device else {
            return;
        };
        if table.get("device").and_then(Value::as_str) == Some(device.as_str()) {
            table.remove("device");
        }
    }

    fn table_of<T: Serialize>(&self, value: &T) -> Result<toml::Table, ConfigError> {
        toml::Table::try_from(value).map_err(|error| ConfigError::NotWritable {
            path: self.path.clone(),
            error: Box::new(error),
        })
    }

    fn learner_table(&self, base: &Path) -> Result<toml::Table, ConfigError> {
        let mut t = self.table_of(&self.learner)?;
        strip(
            &mut t,
            learner_injections(&self.run, &self.student, &self.network),
        );
        relative_keys(&mut t, &LEARNER_PATH_KEYS, base);
        self.strip_run_device(&mut t);
        Ok(t)
    }

    fn discriminator_table(&self, base: &Path) -> Result<toml::Table, ConfigError> {
        let mut t = self.table_of(&self.discriminator)?;
        if t.get("init") == Some(&path_value(&self.student.checkpoint)) {
            t.remove("init");
        }
        strip(&mut t, discriminator_injections(&self.run));
        relative_keys(&mut t, &DISCRIMINATOR_PATH_KEYS, base);
        self.strip_run_device(&mut t);
        Ok(t)
    }

    fn teacher_tables(&self, base: &Path) -> Result<Vec<Value>, ConfigError> {
        self.teachers
            .iter()
            .map(|teacher| {
                let mut t = self.table_of(teacher)?;
                let cache = default_teacher_cache(&self.run, &teacher.name);
                if t.get("cache") == Some(&path_value(&cache)) {
                    t.remove("cache");
                }
                relative_keys(&mut t, &TEACHER_PATH_KEYS, base);
                if teacher_has_device(&t) {
                    self.strip_run_device(&mut t);
                }
                Ok(Value::Table(t))
            })
            .collect()
    }

    /// The run-level sections, and the plain ones unless they hold only defaults.
    fn run_level_tables(&self, base: &Path) -> Result<toml::Table, ConfigError> {
        let mut run = self.run.clone();
        run.dir = relative(base, &run.dir);
        let mut data = self.data.clone();
        data.path = relative(base, &data.path);
        let mut student = self.student.clone();
        student.checkpoint = relative(base, &student.checkpoint);
        let mut security = self.security.clone();
        for p in security_paths(&mut security) {
            *p = relative(base, p);
        }
        let mut file = toml::Table::new();
        file.insert("run".into(), Value::Table(self.table_of(&run)?));
        file.insert("data".into(), Value::Table(self.table_of(&data)?));
        file.insert("student".into(), Value::Table(self.table_of(&student)?));
        file.insert(
            "rollout".into(),
            Value::Table(self.table_of(&self.rollout)?),
        );
        if self.network != NetworkSection::default() {
            file.insert(
                "network".into(),
                Value::Table(self.table_of(&self.network)?),
            );
        }
        if self.coordinator != CoordinatorSection::default() {
            let t = self.table_of(&self.coordinator)?;
            file.insert("coordinator".into(), Value::Table(t));
        }
        // `[actors]` as parsing gives it when the file has none: the defaults on the run's device.
        let absent = ActorsSection {
            device: (self.run.device.clone()).unwrap_or_else(|| ActorsSection::default().device),
            ..ActorsSection::default()
        };
        if self.actors != absent {
            let mut actors = self.table_of(&self.actors)?;
            self.strip_run_device(&mut actors);
            file.insert("actors".into(), Value::Table(actors));
        }
        if security != ril_proto::security::SecurityConfig::default() {
            file.insert("security".into(), Value::Table(self.table_of(&security)?));
        }
        Ok(file)
    }

    /// The TOML file that [`RunConfig::parse`] reads back to this config at the same path.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        let base = config_dir(&self.path);
        let mut file = self.run_level_tables(&base)?;
        file.insert("learner".into(), Value::Table(self.learner_table(&base)?));
        let discriminator = self.discriminator_table(&base)?;
        file.insert("discriminator".into(), Value::Table(discriminator));
        let teachers = self.teacher_tables(&base)?;
        if !teachers.is_empty() {
            file.insert("teachers".into(), Value::Array(teachers));
        }
        // One section at a time, in the order of the file's documentation (a table writes its
        // keys sorted): `[run]` first, the role sections after the run-level ones.
        let mut text = String::new();
        for name in crate::TOP_LEVEL {
            if let Some((key, value)) = file.remove_entry(*name) {
                let section = toml::Table::from_iter([(key, value)]);
                let written =
                    toml::to_string(&section).map_err(|error| ConfigError::NotWritable {
                        path: self.path.clone(),
                        error: Box::new(error),
                    })?;
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&written);
            }
        }
        Ok(text)
    }

    /// Writes [`RunConfig::to_toml`] to the config's path (atomically), after `header` (comment
    /// lines saying who wrote it).
    pub fn save(&self, header: &str) -> Result<(), ConfigError> {
        let text = format!("{header}{}", self.to_toml()?);
        ril_common::fs::write_atomic(&self.path, text.as_bytes())?;
        Ok(())
    }
}
