//! Test datasets: the synthetic shapes benchmark written to real files.

use std::path::{Path, PathBuf};

use ril_data::shapes::{SynthConfig, write_dataset};

/// Writes a shapes dataset with `n_train` training rows (real PNGs) under `dir`; returns the
/// dataset directory.
pub fn shapes_dataset(dir: &Path, n_train: usize) -> PathBuf {
    let out = dir.join("data");
    write_dataset(
        &SynthConfig {
            seed: 7,
            n_train,
            n_val: 1,
            n_test: 1,
            image_size: 32,
            ..Default::default()
        },
        &out,
    )
    .unwrap();
    out
}
