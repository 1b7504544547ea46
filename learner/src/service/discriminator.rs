//! What the discriminator trains on: the responses of the groups rank 0 accepted, per
//! iteration, labelled student (1) or teacher (0). After an iteration trains, the service sends
//! that iteration's responses to D for one step ([`super::links::DiscriminatorLink`]), before
//! publishing the next version, so every group of the next version is scored by the updated D.

use std::collections::BTreeMap;
use std::sync::Mutex;

use ril_data::Row;

use crate::grpo::ResponseSource;
use crate::service::groups::IncomingGroup;
use crate::service::links::DiscriminatorStep;

/// One response with its label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelledResponse {
    pub text: String,
    pub from_student: bool,
}

/// A question and its labelled responses.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledGroup {
    pub row: Row,
    pub responses: Vec<LabelledResponse>,
}

impl From<&IncomingGroup> for LabelledGroup {
    fn from(g: &IncomingGroup) -> Self {
        Self {
            row: g.row.clone(),
            responses: g
                .responses
                .iter()
                .map(|r| LabelledResponse {
                    text: r.text.clone(),
                    from_student: r.source == ResponseSource::Student,
                })
                .collect(),
        }
    }
}

/// Labelled groups of accepted groups, per iteration.
#[derive(Debug, Default)]
pub struct DiscriminatorBuffer {
    by_iteration: Mutex<BTreeMap<u64, Vec<LabelledGroup>>>,
}

impl DiscriminatorBuffer {
    pub fn add(&self, iteration: u64, group: LabelledGroup) {
        self.lock().entry(iteration).or_default().push(group);
    }

    /// The groups of `iteration`; older iterations are dropped (they can no longer train:
    /// their groups were dropped or re-issued).
    pub fn take(&self, iteration: u64) -> Vec<LabelledGroup> {
        let mut b = self.lock();
        let groups = b.remove(&iteration).unwrap_or_default();
        b.retain(|&it, _| it > iteration);
        groups
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Vec<LabelledGroup>>> {
        // Every update is one insert or remove: a panic elsewhere cannot leave it half-done.
        self.by_iteration
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// The metrics of a discriminator step on `items` responses.
pub fn step_metrics(step: &DiscriminatorStep, items: usize) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    if !step.skipped {
        m.insert("d_train_loss".to_string(), f64::from(step.loss));
        m.insert("d_train_accuracy".to_string(), f64::from(step.accuracy));
    }
    m.insert("d_step".to_string(), step.step as f64);
    m.insert("d_train_items".to_string(), items as f64);
    m.insert(D_TRAIN_FAILED.to_string(), 0.0);
    m
}

/// The step metric that says D's Train failed for the iteration (1) or not (0): D's update was
/// lost, the policy trained on. Shown by `ril status` with the step's other metrics.
pub const D_TRAIN_FAILED: &str = "d_train_failed";

#[cfg(test)]
mod tests {
    use super::*;

    fn group(id: &str) -> LabelledGroup {
        LabelledGroup {
            row: Row {
                id: id.into(),
                images: vec![],
                messages: vec![],
                answer: "red".into(),
                answer_type: None,
                teacher_answers: Default::default(),
                family: None,
                extra: Default::default(),
            },
            responses: vec![LabelledResponse {
                text: "red".into(),
                from_student: true,
            }],
        }
    }

    #[test]
    fn an_iteration_takes_its_own_groups_and_drops_older_ones() {
        let buffer = DiscriminatorBuffer::default();
        buffer.add(0, group("a"));
        buffer.add(1, group("b"));
        buffer.add(1, group("c"));
        buffer.add(2, group("d"));
        let taken: Vec<String> = buffer.take(1).into_iter().map(|g| g.row.id).collect();
        assert_eq!(taken, ["b", "c"]);
        assert!(buffer.take(0).is_empty(), "iteration 0 was dropped");
        assert_eq!(buffer.take(2).len(), 1);
    }

    #[test]
    fn a_skipped_step_reports_no_loss() {
        let step = DiscriminatorStep {
            loss: 0.5,
            accuracy: 0.75,
            step: 3,
            skipped: true,
        };
        let m = step_metrics(&step, 8);
        assert_eq!(m.get("d_train_loss"), None);
        assert_eq!((m["d_step"], m["d_train_items"]), (3.0, 8.0));
        let m = step_metrics(
            &DiscriminatorStep {
                skipped: false,
                ..step
            },
            8,
        );
        assert_eq!(m["d_train_accuracy"], 0.75);
    }
}
