//! `ril experiment ablation`'s flags; the experiment itself is `ril_orchestrate::experiment`.

use std::path::PathBuf;

use ril_orchestrate::experiment::{AblationOptions, VARIANTS};
use ril_orchestrate::runs::STUDENTS;

use crate::demo::PretrainArgs;

#[derive(Debug, clap::Args)]
pub struct AblationArgs {
    /// Where the runs, the table (`ablation.md`, `ablation.json`) and the plot go.
    #[arg(long, default_value = "runs/ablation")]
    pub out: PathBuf,
    /// The built-in models (the students and the teachers).
    #[arg(long, default_value = "models/builtin")]
    pub models: PathBuf,
    /// The student (its model directory under `--models`), as in `ril demo`.
    #[arg(long, default_value = STUDENTS[0].0)]
    pub student: String,
    /// Teacher 1 and teacher 2, by name (`terse`, `reasoned`, `narrated`): the variants with
    /// one teacher take one of these, the others both. Two teachers with the same answer
    /// format and different wording, as the paper's are.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_value = "reasoned,narrated")]
    pub teachers: Vec<String>,
    /// The student's generation budget in every variant (rollouts and evaluation).
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: u32,
    /// A dataset directory; default: the demo's `shapes` benchmark, written under `--out`.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The split the final policies are evaluated on. Tune on `val`; report `test`.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Rows of the split evaluated (greedy).
    #[arg(long, default_value_t = 500)]
    pub eval_rows: usize,
    /// Seeds per variant (0, 1, ..., N-1).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// RIL iterations per run: the same budget for every variant.
    #[arg(long, default_value_t = 40)]
    pub iterations: u64,
    #[arg(long, default_value_t = 4)]
    pub questions_per_iteration: u64,
    #[arg(long, default_value_t = 4)]
    pub group_size: u32,
    #[arg(long, default_value_t = 2)]
    pub actors: u32,
    /// The policy's learning rate (every variant).
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// D's pre-training, as `ril demo` does, for every variant that uses the similarity
    /// reward: one pre-trained D per teacher set, shared by its variants and seeds.
    #[command(flatten)]
    pub pretrain: PretrainArgs,
    /// Comma-separated subset of the variants (default: all); `--list-variants` names them.
    #[arg(long, value_delimiter = ',')]
    pub variants: Vec<String>,
    /// Print the variants and exit.
    #[arg(long)]
    pub list_variants: bool,
}

impl AblationArgs {
    pub fn options(&self) -> AblationOptions {
        AblationOptions {
            out: self.out.clone(),
            models: self.models.clone(),
            student: self.student.clone(),
            teachers: self.teachers.clone(),
            max_new_tokens: self.max_new_tokens,
            data: self.data.clone(),
            split: self.split.clone(),
            eval_rows: self.eval_rows,
            seeds: self.seeds,
            iterations: self.iterations,
            questions_per_iteration: self.questions_per_iteration,
            group_size: self.group_size,
            actors: self.actors,
            lr: self.lr,
            pretrain: self.pretrain.settings(),
            variants: self.variants.clone(),
        }
    }
}

pub fn ablation(args: &AblationArgs) -> anyhow::Result<()> {
    if args.list_variants {
        for v in VARIANTS {
            println!("{:14} {}", v.key, v.label);
        }
        return Ok(());
    }
    let ril = ril_orchestrate::RilBinary::current()?;
    Ok(ril_orchestrate::experiment::ablation(
        &ril,
        &args.options(),
    )?)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;
    use ril_orchestrate::experiment::{check_options, pretrained_d_dir, variant};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: AblationArgs,
    }

    fn options(argv: &[&str]) -> AblationOptions {
        let mut all = vec!["ablation"];
        all.extend_from_slice(argv);
        Cli::parse_from(all).a.options()
    }

    #[test]
    fn d_is_pre_trained_once_per_teacher_set_for_the_variants_that_score_with_it() {
        let args = options(&["--out", "abl"]);
        let run = |key: &str| Path::new("abl/runs").join(format!("{key}-s1"));
        let d = |key: &str| pretrained_d_dir(&args, &variant(key).unwrap(), &run(key));
        let both = Some(PathBuf::from("abl/discriminators/reasoned+narrated"));
        for key in ["ril", "il", "ril-frozen-d", "ril-grpo-std"] {
            assert_eq!(d(key), both, "{key}");
        }
        assert_eq!(
            d("ril-t1"),
            Some(PathBuf::from("abl/discriminators/reasoned"))
        );
        assert_eq!(
            d("ril-t2"),
            Some(PathBuf::from("abl/discriminators/narrated"))
        );
        // Other teachers: the sets are named after them.
        let other = options(&["--out", "abl", "--teachers", "terse,reasoned"]);
        assert_eq!(
            pretrained_d_dir(&other, &variant("ril").unwrap(), &run("ril")),
            Some(PathBuf::from("abl/discriminators/terse+reasoned"))
        );
        for key in ["base", "rl", "ril-no-d"] {
            assert_eq!(d(key), None, "{key}");
        }
        let none = options(&["--pretrain-questions", "0"]);
        assert_eq!(
            pretrained_d_dir(&none, &variant("ril").unwrap(), &run("ril")),
            None
        );
    }

    #[test]
    fn the_ablation_refuses_teacher_lists_it_cannot_compare_naming_them() {
        let check = |extra: &[&str]| check_options(&options(extra));
        check(&[]).unwrap();
        check(&["--teachers", "terse,narrated", "--student", "student"]).unwrap();
        let e = check(&["--teachers", "reasoned"]).unwrap_err().to_string();
        assert!(e.contains("two teachers") && e.contains("got 1"), "{e}");
        let e = check(&["--teachers", "reasoned,reasoned"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("both \"reasoned\""), "{e}");
        let e = check(&["--teachers", "reasoned,loud"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"loud\""), "{e}");
        let e = check(&["--student", "teacher-terse"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--student") && e.contains("student-reasoned"),
            "{e}"
        );
        let e = check(&["--seeds", "0"]).unwrap_err().to_string();
        assert!(e.contains("--seeds"), "{e}");
    }
}
