//! Warnings for the ways RIL goes wrong, checked after every learner step over a window of recent
//! steps, each logged once per onset with the step and the numbers:
//! - **D collapse**: the discriminator's accuracy stuck at chance (<= 0.55) or at certainty
//!   (>= 0.99) for the whole window: its similarity reward carries no information.
//! - **Reward hacking of D**: the students' similarity reward rising while their answer reward
//!   falls (first half of the window against the second), unless D has collapsed (then the
//!   similarity reward is noise).
//! - **KL blow-up**: the mean KL to the reference above `kl_max`.
//! - **Entropy collapse**: the policy's entropy below `entropy_min_fraction` of its value at the
//!   first step seen.
//!
//! The learner only warns; what to do (lower the learning rate, raise beta, retrain D) is the
//! user's call.

use std::collections::VecDeque;

/// Thresholds; the defaults suit the built-in models and the paper's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DiagnosticsConfig {
    pub window: usize,
    pub d_chance: f64,
    pub d_certain: f64,
    pub kl_max: f64,
    pub entropy_min_fraction: f64,
    /// The smallest change in mean reward (between the window's halves) that counts.
    pub reward_delta: f64,
}

impl Default for DiagnosticsConfig {
    fn default() -> Self {
        Self {
            window: 10,
            d_chance: 0.55,
            d_certain: 0.99,
            kl_max: 1.0,
            entropy_min_fraction: 0.2,
            reward_delta: 0.1,
        }
    }
}

/// One step's numbers (None where the step did not define them).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepSignals {
    pub d_accuracy: Option<f64>,
    pub reward_sim_student: Option<f64>,
    pub reward_ans_student: Option<f64>,
    pub kl: f64,
    pub entropy: f64,
}

/// A problem found at a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Warning {
    DCollapse {
        step: u64,
        mean_accuracy: f64,
    },
    RewardHacking {
        step: u64,
        sim: (f64, f64),
        ans: (f64, f64),
    },
    KlBlowUp {
        step: u64,
        kl: f64,
        limit: f64,
    },
    EntropyCollapse {
        step: u64,
        entropy: f64,
        initial: f64,
    },
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Warning::DCollapse {
                step,
                mean_accuracy,
            } => write!(
                f,
                "step {step}: discriminator collapse: its accuracy has been {mean_accuracy:.3} on \
                 average over the window (at chance or at certainty), so the similarity reward \
                 says nothing; check D's learning rate, or pre-train it"
            ),
            Warning::RewardHacking { step, sim, ans } => write!(
                f,
                "step {step}: the student may be gaming the discriminator: its similarity reward \
                 went {:.3} -> {:.3} while its answer reward went {:.3} -> {:.3}",
                sim.0, sim.1, ans.0, ans.1
            ),
            Warning::KlBlowUp { step, kl, limit } => write!(
                f,
                "step {step}: KL to the reference is {kl:.3} (> {limit}): the policy is running \
                 away; lower the learning rate or raise kl_beta"
            ),
            Warning::EntropyCollapse {
                step,
                entropy,
                initial,
            } => write!(
                f,
                "step {step}: entropy collapse: {entropy:.3} per token against {initial:.3} at \
                 the start; the policy has stopped exploring"
            ),
        }
    }
}

/// The rolling state; `observe` returns the warnings that begin at this step (a condition that
/// persists is reported once, and again only after it has cleared).
#[derive(Debug, Default)]
pub struct Diagnostics {
    cfg: DiagnosticsConfig,
    recent: VecDeque<StepSignals>,
    initial_entropy: Option<f64>,
    active: [bool; 4],
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

impl Diagnostics {
    pub fn new(cfg: DiagnosticsConfig) -> Self {
        Self {
            cfg,
            ..Self::default()
        }
    }

    pub fn observe(&mut self, step: u64, s: StepSignals) -> Vec<Warning> {
        let cfg = self.cfg.clone();
        if self.initial_entropy.is_none() && s.entropy.is_finite() && s.entropy > 0.0 {
            self.initial_entropy = Some(s.entropy);
        }
        self.recent.push_back(s);
        while self.recent.len() > cfg.window.max(2) {
            self.recent.pop_front();
        }
        let full = self.recent.len() >= cfg.window.max(2);
        let mut found: [Option<Warning>; 4] = Default::default();

        if full {
            let accs: Vec<f64> = self.recent.iter().filter_map(|r| r.d_accuracy).collect();
            if accs.len() == self.recent.len()
                && (accs.iter().all(|&a| a <= cfg.d_chance)
                    || accs.iter().all(|&a| a >= cfg.d_certain))
            {
                found[0] = Some(Warning::DCollapse {
                    step,
                    mean_accuracy: mean(accs.iter().copied()).unwrap_or(0.0),
                });
            }
            let half = self.recent.len() / 2;
            let halves = |f: fn(&StepSignals) -> Option<f64>| {
                let a = mean(self.recent.iter().take(half).filter_map(f));
                let b = mean(self.recent.iter().skip(half).filter_map(f));
                a.zip(b)
            };
            // A collapsed D's similarity reward is noise: its swings are not the student's doing.
            if found[0].is_none()
                && let (Some(sim), Some(ans)) = (
                    halves(|r| r.reward_sim_student),
                    halves(|r| r.reward_ans_student),
                )
                && sim.1 - sim.0 >= cfg.reward_delta
                && ans.0 - ans.1 >= cfg.reward_delta
            {
                found[1] = Some(Warning::RewardHacking { step, sim, ans });
            }
        }
        if s.kl.is_finite() && s.kl > cfg.kl_max {
            found[2] = Some(Warning::KlBlowUp {
                step,
                kl: s.kl,
                limit: cfg.kl_max,
            });
        }
        if let Some(initial) = self.initial_entropy
            && s.entropy.is_finite()
            && s.entropy < cfg.entropy_min_fraction * initial
        {
            found[3] = Some(Warning::EntropyCollapse {
                step,
                entropy: s.entropy,
                initial,
            });
        }
        let mut out = Vec::new();
        for (i, w) in found.into_iter().enumerate() {
            match w {
                Some(w) if !self.active[i] => {
                    self.active[i] = true;
                    out.push(w);
                }
                Some(_) => {}
                None => self.active[i] = false,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(d: f64, sim: f64, ans: f64, kl: f64, ent: f64) -> StepSignals {
        StepSignals {
            d_accuracy: Some(d),
            reward_sim_student: Some(sim),
            reward_ans_student: Some(ans),
            kl,
            entropy: ent,
        }
    }

    #[test]
    fn similarity_swings_of_a_collapsed_d_are_not_called_hacking() {
        let mut d = Diagnostics::new(DiagnosticsConfig::default());
        let mut all = Vec::new();
        for step in 0..10 {
            let (sim, ans) = if step < 5 { (0.0, 0.6) } else { (1.0, 0.2) };
            all.extend(d.observe(step, sig(0.5, sim, ans, 0.05, 1.5)));
        }
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(matches!(all[0], Warning::DCollapse { .. }), "{all:?}");
    }

    #[test]
    fn a_healthy_run_is_quiet() {
        let mut d = Diagnostics::new(DiagnosticsConfig::default());
        for step in 0..40 {
            let acc = 0.7 + 0.01 * (step % 3) as f64;
            assert!(d.observe(step, sig(acc, 0.3, 0.5, 0.05, 1.5)).is_empty());
        }
    }

    #[test]
    fn each_failure_is_reported_once_when_it_begins_with_its_numbers() {
        let mut d = Diagnostics::new(DiagnosticsConfig::default());
        let mut all = Vec::new();
        // D at chance for 10 steps.
        for step in 0..12 {
            all.extend(d.observe(step, sig(0.5, 0.3, 0.5, 0.05, 1.5)));
        }
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(
            matches!(all[0], Warning::DCollapse { step: 9, .. }),
            "{:?}",
            all[0]
        );
        assert!(all[0].to_string().contains("step 9") && all[0].to_string().contains("0.500"));
        // D recovers; then sim up, ans down; KL over 1; entropy to a tenth.
        all.clear();
        for step in 12..22 {
            all.extend(d.observe(step, sig(0.8, 0.2, 0.6, 0.05, 1.5)));
        }
        assert!(all.is_empty(), "{all:?}");
        for step in 22..32 {
            all.extend(d.observe(step, sig(0.8, 0.9, 0.2, 0.05, 1.5)));
        }
        assert_eq!(all.len(), 1, "{all:?}");
        let text = all[0].to_string();
        assert!(text.contains("gaming the discriminator"), "{text}");
        all.clear();
        all.extend(d.observe(32, sig(0.8, 0.9, 0.2, 2.5, 0.1)));
        all.extend(d.observe(33, sig(0.8, 0.9, 0.2, 2.6, 0.1)));
        let kinds: Vec<String> = all.iter().map(|w| w.to_string()).collect();
        assert_eq!(all.len(), 2, "{kinds:?}");
        assert!(
            kinds
                .iter()
                .any(|k| k.contains("KL to the reference is 2.500")),
            "{kinds:?}"
        );
        assert!(
            kinds.iter().any(|k| k.contains("entropy collapse: 0.100")),
            "{kinds:?}"
        );
    }
}
