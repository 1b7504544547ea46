//! Accuracy of a model on a dataset split: generate (greedy, or k samples), check each answer
//! with the rule-based checker, report overall and per question family.

use std::collections::BTreeMap;

use ril_data::Row;
use ril_data::answer::check;
use ril_model::bundle::Bundle;
use ril_model::generate::{SamplingParams, generate};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use ril_prompt::prompt;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Samples per question; accuracy is their mean (1 with temperature 0: greedy).
    pub samples: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    pub seed: u64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            samples: 1,
            temperature: 0.0,
            top_p: 1.0,
            max_new_tokens: 32,
            batch_size: 16,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RowResult {
    pub id: String,
    pub family: Option<String>,
    pub reference: String,
    pub responses: Vec<String>,
    pub extracted: Vec<String>,
    pub correct: Vec<bool>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FamilyScore {
    pub correct: f64,
    pub total: usize,
    pub accuracy: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalReport {
    pub accuracy: f64,
    pub questions: usize,
    pub samples_per_question: usize,
    pub per_family: BTreeMap<String, FamilyScore>,
    pub rows: Vec<RowResult>,
}

/// Scores a set of (row, responses) pairs: the checker, the aggregation. Separate from
/// generation so it is tested on hand-made responses.
pub fn score(rows: &[Row], responses: &[Vec<String>]) -> EvalReport {
    let mut results = Vec::with_capacity(rows.len());
    let mut per_family: BTreeMap<String, FamilyScore> = BTreeMap::new();
    let mut sum = 0f64;
    let samples = responses.first().map_or(1, Vec::len).max(1);
    for (row, resp) in rows.iter().zip(responses) {
        let verdicts: Vec<_> = resp
            .iter()
            .map(|r| check(r, &row.answer, row.answer_type))
            .collect();
        let correct: Vec<bool> = verdicts.iter().map(|v| v.correct).collect();
        let mean = correct.iter().filter(|c| **c).count() as f64 / correct.len().max(1) as f64;
        sum += mean;
        let fam = per_family
            .entry(row.family.clone().unwrap_or_else(|| "all".into()))
            .or_default();
        fam.correct += mean;
        fam.total += 1;
        results.push(RowResult {
            id: row.id.clone(),
            family: row.family.clone(),
            reference: row.answer.clone(),
            responses: resp.clone(),
            extracted: verdicts.iter().map(|v| v.extracted.clone()).collect(),
            correct,
        });
    }
    for f in per_family.values_mut() {
        f.accuracy = f.correct / f.total.max(1) as f64;
    }
    EvalReport {
        accuracy: sum / rows.len().max(1) as f64,
        questions: rows.len(),
        samples_per_question: samples,
        per_family,
        rows: results,
    }
}

/// Generates answers for `rows` and scores them.
pub fn evaluate(
    bundle: &Bundle,
    rows: &[Row],
    cfg: &EvalConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    let samples = cfg.samples.max(1);
    let mut responses: Vec<Vec<String>> = vec![Vec::with_capacity(samples); rows.len()];
    let stop = bundle.stop_token_ids();
    let prompts = rows
        .iter()
        .map(|r| prompt(bundle, r))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    // One flat list of (row, sample) jobs, batched.
    let jobs: Vec<(usize, usize)> = (0..rows.len())
        .flat_map(|r| (0..samples).map(move |s| (r, s)))
        .collect();
    let mut done = 0;
    for (batch_index, chunk) in jobs.chunks(cfg.batch_size.max(1)).enumerate() {
        let batch_prompts: Vec<_> = chunk.iter().map(|&(r, _)| prompts[r].clone()).collect();
        let params = SamplingParams {
            temperature: cfg.temperature,
            top_p: cfg.top_p,
            top_k: 0,
            repetition_penalty: 1.0,
            max_new_tokens: cfg.max_new_tokens,
            stop_token_ids: stop.clone(),
            suppress_token_ids: Vec::new(),
            seed: cfg.seed.wrapping_add(batch_index as u64),
        };
        for (&(r, _), g) in chunk
            .iter()
            .zip(generate(&bundle.model, &batch_prompts, &params)?)
        {
            responses[r].push(bundle.tokenizer.decode(&g.token_ids, true)?);
        }
        done += chunk.len();
        progress(done, jobs.len());
    }
    Ok(score(rows, &responses))
}
