//! Every committed corpus input (seeds, edge cases, and the inputs of crashes fixed since)
//! through its harness: a regression test that runs on stable with `cargo test`.

use ril_fuzz::{TARGETS, corpus_dir};

#[test]
fn every_target_has_a_corpus_and_every_input_passes() {
    for (name, harness) in TARGETS {
        let dir = corpus_dir(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{name}: no corpus in {}", dir.display());
        for f in files {
            let data = std::fs::read(&f).unwrap();
            let r = std::panic::catch_unwind(|| harness(&data));
            assert!(r.is_ok(), "{name}: {} panicked", f.display());
        }
    }
}
