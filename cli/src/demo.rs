//! `ril demo`'s flags; the demo itself is `ril_orchestrate::demo`.

use std::path::PathBuf;

use ril_orchestrate::demo::DemoOptions;
use ril_orchestrate::runs::{PretrainSettings, STUDENTS};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The run directory: data, run state, checkpoints, logs, `report.json`, `metrics.jsonl`.
    #[arg(long, visible_alias = "dir", default_value = "runs/demo")]
    pub out: PathBuf,
    /// The built-in models (student, student-reasoned, teacher-terse, teacher-reasoned,
    /// teacher-narrated).
    #[arg(long, default_value = "models/builtin")]
    pub models: PathBuf,
    /// The student, by its model directory under `--models`: `student-reasoned` (writes the
    /// scene and a look-up before `Answer: X`, briefly trained) or `student` (answers bare).
    #[arg(long, default_value = STUDENTS[0].0)]
    pub student: String,
    /// RIL iterations (learner steps). 300 at lr 2e-4 with the reasoned teacher and the
    /// reasoning student: the best of the settings tried on the validation split
    /// (docs/RESULTS.md).
    #[arg(long, default_value_t = 300)]
    pub iterations: u64,
    /// The teachers in the run, by name: `terse` (teacher-terse), `reasoned`
    /// (teacher-reasoned), `narrated` (teacher-narrated); the last two reason before they
    /// answer. The reasoned one alone, in the student's own answer format, is the one the
    /// settings were tuned with on the validation split; with the narrated one as well, D tells
    /// the styles apart and pulls the student off its format (docs/RESULTS.md). Two is the
    /// paper's setting.
    #[arg(long, value_delimiter = ',', default_value = "reasoned")]
    pub teachers: Vec<String>,
    #[arg(long, default_value_t = 4)]
    pub questions_per_iteration: u64,
    /// G: student rollouts per question (and teacher answers per question).
    #[arg(long, default_value_t = 4)]
    pub group_size: u32,
    #[arg(long, default_value_t = 2)]
    pub actors: u32,
    /// The student's generation budget (rollouts, D pre-training's student answers and the
    /// evaluations); also Dr.GRPO's constant normaliser. A student that reasons before it
    /// answers needs ~128 on the benchmark.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: u32,
    /// Test questions evaluated before and after (greedy).
    #[arg(long, default_value_t = 500)]
    pub eval_rows: usize,
    /// The policy's learning rate (tuned on the validation split: docs/RESULTS.md).
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// The run's seed (sampling, data order, D's head).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Checkpoints evaluated on the held-out questions during the run, for the accuracy plot
    /// (the last one is the final policy).
    #[arg(long, default_value_t = 4)]
    pub accuracy_points: u64,
    #[command(flatten)]
    pub pretrain: PretrainArgs,
    /// SFT steps for the models made on first use when the built-in ones are missing.
    #[arg(long, default_value_t = 300)]
    pub fallback_sft_steps: usize,
    /// Every role on this device (`[run] device` of the run config), the evaluations too:
    /// cpu, cuda or cuda:N. Default: the CPU.
    #[arg(long, value_parser = crate::device::form)]
    pub device: Option<String>,
}

/// D's pre-training before RIL, for `ril demo` and `ril experiment ablation`.
#[derive(Debug, Clone, clap::Args)]
pub struct PretrainArgs {
    /// Questions whose student and teacher answers (4 each) pre-train the discriminator before
    /// RIL (0: no pre-training; D starts from the student with a fresh head, so a frozen D
    /// gives every response r_sim = 0).
    #[arg(long, default_value_t = 64)]
    pub pretrain_questions: usize,
    /// D's pre-training steps.
    #[arg(long, default_value_t = 30)]
    pub pretrain_steps: u64,
}

impl PretrainArgs {
    pub fn settings(&self) -> PretrainSettings {
        PretrainSettings {
            questions: self.pretrain_questions,
            steps: self.pretrain_steps,
        }
    }
}

impl DemoArgs {
    pub fn options(&self) -> DemoOptions {
        DemoOptions {
            out: self.out.clone(),
            models: self.models.clone(),
            student: self.student.clone(),
            iterations: self.iterations,
            teachers: self.teachers.clone(),
            questions_per_iteration: self.questions_per_iteration,
            group_size: self.group_size,
            actors: self.actors,
            max_new_tokens: self.max_new_tokens,
            eval_rows: self.eval_rows,
            lr: self.lr,
            seed: self.seed,
            accuracy_points: self.accuracy_points,
            pretrain: self.pretrain.settings(),
            fallback_sft_steps: self.fallback_sft_steps,
            device: self.device.clone(),
        }
    }
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let ril = ril_orchestrate::RilBinary::current()?;
    Ok(ril_orchestrate::demo::run(&ril, &args.options())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use ril_orchestrate::demo::needed_models;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        demo: DemoArgs,
    }

    /// `--device` puts the whole run on one device; its form is checked when the flags are read.
    #[test]
    fn the_demo_device_is_checked_for_its_form_and_defaults_to_none() {
        let parse = |argv: &[&str]| Cli::try_parse_from(argv).map(|c| c.demo.options().device);
        assert_eq!(parse(&["ril"]).unwrap(), None);
        assert_eq!(
            parse(&["ril", "--device", "cuda:0"]).unwrap().as_deref(),
            Some("cuda:0")
        );
        let e = parse(&["ril", "--device", "gpu"]).unwrap_err().to_string();
        assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
    }

    #[test]
    fn the_demo_needs_the_student_and_only_its_own_teachers() {
        let needed = |argv: &[&str]| needed_models(&Cli::parse_from(argv).demo.options());
        assert_eq!(
            needed(&["ril"]).unwrap(),
            ["student-reasoned", "teacher-reasoned"]
        );
        assert_eq!(
            needed(&[
                "ril",
                "--teachers",
                "terse,narrated",
                "--student",
                "student",
            ])
            .unwrap(),
            ["student", "teacher-terse", "teacher-narrated"]
        );
        let e = needed(&["ril", "--teachers", "loud"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"loud\"") && e.contains("terse, reasoned, narrated"),
            "{e}"
        );
        let e = needed(&["ril", "--student", "teacher-terse"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--student") && e.contains("student-reasoned, student"),
            "{e}"
        );
    }
}
