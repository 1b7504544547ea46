//! Sampling settings: the one type every crate uses for them. The run config's `[rollout]`,
//! a teacher server's defaults and a request's settings all deserialise into
//! [`SamplingParams`], and `ril_model::generate` samples with it. The wire message
//! (`ril.v1.SamplingSettings`) converts to and from it in `ril-proto`.

use serde::{Deserialize, Serialize};

/// How to sample a response. `temperature == 0` means greedy decoding. A settings table may
/// leave out any key: it takes [`SamplingParams::default`]'s value (the paper's sampling).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    pub top_p: f64,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1 disables it; >1 discourages tokens already in the prompt or the response.
    pub repetition_penalty: f64,
    pub max_new_tokens: usize,
    /// Generation of a sequence ends after any of these (it is included in the output).
    pub stop_token_ids: Vec<u32>,
    /// Tokens never sampled. The model's `<image>` placeholder is always added.
    pub suppress_token_ids: Vec<u32>,
    pub seed: u64,
}

/// A sampling setting out of range, named as the settings spell it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sampling {field}: {problem}")]
pub struct SamplingError {
    pub field: &'static str,
    pub problem: &'static str,
}

/// How many new tokens [`SamplingParams::default`] allows: room for a short reasoned answer.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;

impl Default for SamplingParams {
    /// The RIL paper's sampling ([`SamplingParams::paper`]) with [`DEFAULT_MAX_NEW_TOKENS`] and
    /// seed 0.
    fn default() -> Self {
        Self::paper(DEFAULT_MAX_NEW_TOKENS, 0)
    }
}

impl SamplingParams {
    /// Greedy decoding of up to `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            max_new_tokens,
            stop_token_ids: Vec::new(),
            suppress_token_ids: Vec::new(),
            seed: 0,
        }
    }

    /// The RIL paper's rollout settings: temperature 1.0, top-p 0.95, top-k 50, repetition
    /// penalty 1.05.
    pub fn paper(max_new_tokens: usize, seed: u64) -> Self {
        Self {
            temperature: 1.0,
            top_p: 0.95,
            top_k: 50,
            repetition_penalty: 1.05,
            max_new_tokens,
            stop_token_ids: Vec::new(),
            suppress_token_ids: Vec::new(),
            seed,
        }
    }

    /// Checks every value; the error names the field.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let bad = |field, problem| Err(SamplingError { field, problem });
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", "must be finite and >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad("repetition_penalty", "must be finite and > 0");
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// The temperature the returned log-probs are computed at (1 for greedy decoding).
    pub fn logprob_temperature(&self) -> f64 {
        if self.is_greedy() {
            1.0
        } else {
            self.temperature
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_out_of_range_value_is_named() {
        let ok = SamplingParams::paper(8, 0);
        assert_eq!(ok.validate(), Ok(()));
        for (edit, field) in [
            (
                (|p: &mut SamplingParams| p.temperature = -1.0) as fn(&mut SamplingParams),
                "temperature",
            ),
            (|p| p.temperature = f64::NAN, "temperature"),
            (|p| p.top_p = 0.0, "top_p"),
            (|p| p.top_p = 1.5, "top_p"),
            (|p| p.repetition_penalty = 0.0, "repetition_penalty"),
            (
                |p| p.repetition_penalty = f64::INFINITY,
                "repetition_penalty",
            ),
        ] {
            let mut p = ok.clone();
            edit(&mut p);
            let e = p.validate().unwrap_err();
            assert_eq!(e.field, field);
            assert!(
                e.to_string().starts_with(&format!("sampling {field}: ")),
                "{e}"
            );
        }
    }

    #[test]
    fn greedy_log_probs_are_at_temperature_one() {
        assert!(SamplingParams::greedy(4).is_greedy());
        assert_eq!(SamplingParams::greedy(4).logprob_temperature(), 1.0);
        assert_eq!(SamplingParams::paper(4, 0).logprob_temperature(), 1.0);
        let mut hot = SamplingParams::paper(4, 0);
        hot.temperature = 0.7;
        assert_eq!(hot.logprob_temperature(), 0.7);
    }

    #[test]
    fn a_table_may_leave_out_keys_and_gets_the_papers_settings() {
        let p: SamplingParams = serde_json::from_str(r#"{"max_new_tokens": 32}"#).unwrap();
        assert_eq!(p, SamplingParams::paper(32, 0));
        let p: SamplingParams = serde_json::from_str("{}").unwrap();
        assert_eq!(p, SamplingParams::default());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = serde_json::from_str::<SamplingParams>(
            r#"{"temperature":1,"top_p":1,"top_k":0,"repetition_penalty":1,"max_new_tokens":4,"seed":0,"tempreature":2}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("tempreature"), "{e}");
    }
}
