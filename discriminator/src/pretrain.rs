//! Discriminator pre-training (the paper's step between SFT and RIL): D learns to tell the
//! student's answers from the teachers' before online training starts, on k answers of each per
//! question (16 and 16 in the paper), with binary cross-entropy and a linearly decaying
//! learning rate (1e-5 -> 1e-6 in the paper).
//!
//! The pieces, usable one by one: [`student_answers`] (sampling the student checkpoint with the
//! paper's settings), [`teacher_answers`] (the rows' `teacher_answers`, topped up from teacher
//! servers over gRPC), [`labelled_examples`], [`split_held_out`] (by question), and [`pretrain`]
//! (the training loop; resumable, since each step's batch is a function of the step). The
//! whole pipeline behind `ril discriminator pretrain` is [`run_pretrain`].

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use ril_data::Row;
use ril_data::dataset::{ReadOptions, read_all, split_file};
use ril_model::bundle::Bundle;
use ril_model::{Head, ModelError, SamplingParams, generate};
use ril_proto::RpcError;
use ril_proto::client::{Channel, connect};
use ril_proto::convert::row_to_question;
use ril_proto::v1::AnswerRequest;
use ril_proto::v1::teacher_client::TeacherClient;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::checkpoint::latest_checkpoint;
use crate::error::{DiscriminatorError, Result};
use crate::model::{DiscriminatorModel, Evaluation, LabelledResponse, TrainOutcome};
use crate::options::DiscriminatorOptions;

/// File in the output directory holding the labelled answers, so a resumed pre-training does
/// not sample and ask the teachers again.
pub const EXAMPLES_FILE: &str = "pretrain_examples.jsonl";

/// The training loop's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainSchedule {
    /// Optimizer steps in all (a resumed D continues up to this).
    pub steps: u64,
    pub batch_size: usize,
    /// Learning rate at step 0, decaying linearly to `min_lr` at the last step.
    pub lr: f64,
    pub min_lr: f64,
    /// Held-out evaluation every this many steps (0: only before and after).
    pub eval_every: u64,
    /// Save a checkpoint every this many steps (0: only at the end).
    pub save_every: u64,
    /// Seeds the order examples are visited in.
    pub seed: u64,
}

impl PretrainSchedule {
    /// The learning rate of the step after `step` steps.
    pub fn lr_at(&self, step: u64) -> f64 {
        if self.steps <= 1 {
            return self.lr;
        }
        let t = (step.min(self.steps - 1)) as f64 / (self.steps - 1) as f64;
        self.lr + (self.min_lr - self.lr) * t
    }

    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(DiscriminatorError::config(
                "batch_size",
                "must be at least 1",
            ));
        }
        for (field, v) in [("lr", self.lr), ("min_lr", self.min_lr)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(DiscriminatorError::config(field, "must be finite and >= 0"));
            }
        }
        Ok(())
    }
}

/// Indices of the examples of the batch after `step` steps: epochs of a seeded shuffle, laid
/// end to end. A function of the step, so a resumed run sees the batches it would have seen.
pub fn batch_indices(n: usize, batch_size: usize, seed: u64, step: u64) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let start = step as usize * batch_size;
    let mut order_epoch = usize::MAX;
    let mut order: Vec<usize> = Vec::new();
    (start..start + batch_size)
        .map(|position| {
            let epoch = position / n;
            if epoch != order_epoch {
                order = (0..n).collect();
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(epoch as u64);
                order.shuffle(&mut rng);
                order_epoch = epoch;
            }
            order[position % n]
        })
        .collect()
}

/// Progress of [`pretrain`], for logs and progress bars.
#[derive(Debug, Clone, PartialEq)]
pub enum PretrainEvent {
    Step {
        step: u64,
        total: u64,
        loss: f32,
        /// On the batch, before the step.
        accuracy: f32,
        lr: f64,
        grad_norm: f64,
    },
    Eval {
        step: u64,
        held_out: Evaluation,
    },
    Saved {
        step: u64,
        dir: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct PretrainReport {
    /// D's step at the end.
    pub steps: u64,
    pub n_train: usize,
    pub n_held_out: usize,
    /// Held-out loss and accuracy before the first step of this call and after the last.
    pub initial_held_out: Option<Evaluation>,
    pub final_held_out: Option<Evaluation>,
    /// Loss of the last batch (0 when no step was taken).
    pub final_train_loss: f32,
    pub seconds: f64,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
}

/// Trains `model` on `train` until it reaches `schedule.steps`, evaluating on `held_out`, and
/// saving to `checkpoint_dir` when given.
pub fn pretrain(
    model: &mut DiscriminatorModel,
    train: &[LabelledResponse],
    held_out: &[LabelledResponse],
    schedule: &PretrainSchedule,
    checkpoint_dir: Option<&Path>,
    on_event: &mut dyn FnMut(PretrainEvent),
) -> Result<PretrainReport> {
    schedule.validate()?;
    if train.is_empty() {
        return Err(DiscriminatorError::invalid(
            "examples",
            "no training examples for the discriminator",
        ));
    }
    let started = Instant::now();
    let initial_held_out = evaluate(model, held_out, on_event)?;
    let mut final_train_loss = 0.0;
    let mut checkpoint = None;
    while model.step() < schedule.steps {
        let outcome = pretrain_step(model, train, schedule, on_event)?;
        final_train_loss = outcome.loss;
        if schedule.eval_every > 0
            && outcome.step % schedule.eval_every == 0
            && outcome.step < schedule.steps
        {
            evaluate(model, held_out, on_event)?;
        }
        if schedule.save_every > 0 && outcome.step % schedule.save_every == 0 {
            save(model, checkpoint_dir, &mut checkpoint, on_event)?;
        }
    }
    let final_held_out = evaluate(model, held_out, on_event)?;
    save(model, checkpoint_dir, &mut checkpoint, on_event)?;
    Ok(PretrainReport {
        steps: model.step(),
        n_train: train.len(),
        n_held_out: held_out.len(),
        initial_held_out,
        final_held_out,
        final_train_loss,
        seconds: started.elapsed().as_secs_f64(),
        checkpoint,
    })
}

/// One optimizer step on the batch of the current step (a function of the step).
fn pretrain_step(
    model: &mut DiscriminatorModel,
    train: &[LabelledResponse],
    schedule: &PretrainSchedule,
    on_event: &mut dyn FnMut(PretrainEvent),
) -> Result<TrainOutcome> {
    let step = model.step();
    let batch: Vec<LabelledResponse> =
        batch_indices(train.len(), schedule.batch_size, schedule.seed, step)
            .into_iter()
            .map(|i| train[i].clone())
            .collect();
    let lr = schedule.lr_at(step);
    let outcome = model.train_step_at(&batch, None, lr)?;
    if outcome.skipped {
        return Err(DiscriminatorError::config(
            "frozen",
            "a frozen discriminator cannot be pre-trained",
        ));
    }
    on_event(PretrainEvent::Step {
        step: outcome.step,
        total: schedule.steps,
        loss: outcome.loss,
        accuracy: outcome.accuracy,
        lr,
        grad_norm: outcome.grad_norm,
    });
    Ok(outcome)
}

/// Held-out loss and accuracy (none without held-out examples), reported as an event.
fn evaluate(
    model: &DiscriminatorModel,
    held_out: &[LabelledResponse],
    on_event: &mut dyn FnMut(PretrainEvent),
) -> Result<Option<Evaluation>> {
    if held_out.is_empty() {
        return Ok(None);
    }
    let e = model.evaluate(held_out)?;
    on_event(PretrainEvent::Eval {
        step: model.step(),
        held_out: e,
    });
    Ok(Some(e))
}

/// Saves a checkpoint under `checkpoint_dir` (when given and not already saved at this step),
/// remembering it in `checkpoint`.
fn save(
    model: &DiscriminatorModel,
    checkpoint_dir: Option<&Path>,
    checkpoint: &mut Option<PathBuf>,
    on_event: &mut dyn FnMut(PretrainEvent),
) -> Result<()> {
    if let Some(root) = checkpoint_dir
        && let Some(dir) = model.save_checkpoint(root)?
    {
        on_event(PretrainEvent::Saved {
            step: model.step(),
            dir: dir.clone(),
        });
        *checkpoint = Some(dir);
    }
    Ok(())
}

/// `n` answers of the student to each row, sampled with the paper's settings (temperature 1,
/// top-p 0.95, top-k 50, repetition penalty 1.05), `batch_size` sequences at a time. Every
/// answer has its own random stream, derived from `seed`, the row and the answer's index.
pub fn student_answers(
    student: &Bundle,
    rows: &[Row],
    n: usize,
    max_new_tokens: usize,
    seed: u64,
    batch_size: usize,
) -> Result<Vec<Vec<String>>> {
    let stop = student.stop_token_ids();
    rows.iter()
        .enumerate()
        .map(|(r, row)| {
            let row_error = |source: ModelError| DiscriminatorError::Question {
                id: row.id.clone(),
                source,
            };
            let prompt = ril_prompt::prompt(student, row).map_err(|e| row_error(*e.source))?;
            let mut answers = Vec::with_capacity(n);
            let mut start = 0;
            while start < n {
                let count = batch_size.max(1).min(n - start);
                let params = SamplingParams {
                    stop_token_ids: stop.clone(),
                    ..SamplingParams::paper(
                        max_new_tokens,
                        seed.wrapping_add(
                            ((r * n + start) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                        ),
                    )
                };
                let prompts = vec![prompt.clone(); count];
                for g in generate(&student.model, &prompts, &params).map_err(row_error)? {
                    let text = student
                        .tokenizer
                        .decode(&g.token_ids, true)
                        .map_err(row_error)?;
                    answers.push(text.trim().to_string());
                }
                start += count;
            }
            Ok(answers)
        })
        .collect()
}

/// Up to `n` of the row's own `teacher_answers`, taken round-robin across its teachers.
pub fn answers_from_row(row: &Row, n: usize) -> Vec<String> {
    round_robin(row.teacher_answers.values().cloned().collect(), n)
}

fn round_robin(lists: Vec<Vec<String>>, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    let longest = lists.iter().map(Vec::len).max().unwrap_or(0);
    for i in 0..longest {
        for list in &lists {
            if out.len() == n {
                return out;
            }
            if let Some(a) = list.get(i) {
                out.push(a.clone());
            }
        }
    }
    out
}

/// `n` teacher answers per row: the row's own `teacher_answers` first, then the teacher
/// servers at `teachers` (host:port), the missing ones split evenly between them and
/// interleaved round-robin. A row that ends up with none is an error naming it.
pub async fn teacher_answers(
    rows: &[Row],
    teachers: &[String],
    n: usize,
    timeout: Duration,
    security: &ril_proto::security::Security,
) -> Result<Vec<Vec<String>>> {
    let mut clients = Vec::with_capacity(teachers.len());
    for addr in teachers {
        let channel = connect(addr, timeout, security).await?;
        clients.push((addr.clone(), ril_proto::client::teacher(channel)));
    }
    let mut all = Vec::with_capacity(rows.len());
    for row in rows {
        let mut answers = answers_from_row(row, n);
        let missing = n - answers.len();
        if missing > 0 && !clients.is_empty() {
            let k = clients.len();
            let question = row_to_question(row);
            let asks = clients.iter().enumerate().map(|(j, (addr, client))| {
                let share = missing / k + usize::from(j < missing % k);
                let mut client = client.clone();
                let request = AnswerRequest {
                    question: Some(question.clone()),
                    n: share as u32,
                    sampling: None,
                };
                async move {
                    if share == 0 {
                        return Ok(Vec::new());
                    }
                    ask_teacher(&mut client, addr, request, timeout).await
                }
            });
            let replies = futures_util::future::join_all(asks).await;
            let lists = replies.into_iter().collect::<Result<Vec<_>>>()?;
            answers.extend(round_robin(lists, missing));
        }
        if answers.is_empty() {
            return Err(DiscriminatorError::Question {
                id: row.id.clone(),
                source: ModelError::Input(
                    "no teacher answers: the row has no `teacher_answers` and no teacher server \
                     was given"
                        .into(),
                ),
            });
        }
        all.push(answers);
    }
    Ok(all)
}

/// The answers one teacher gives to the request's question, in index order.
async fn ask_teacher(
    client: &mut TeacherClient<Channel>,
    addr: &str,
    request: AnswerRequest,
    timeout: Duration,
) -> Result<Vec<String>> {
    let question = request
        .question
        .as_ref()
        .map(|q| q.id.clone())
        .unwrap_or_default();
    let failed = |source: RpcError| DiscriminatorError::Teacher {
        question: question.clone(),
        source,
    };
    let answer_failed = |status| failed(RpcError::new("teacher", addr, "Answer", status));
    let collect = async {
        let mut stream = client
            .answer(request)
            .await
            .map_err(answer_failed)?
            .into_inner();
        let mut by_index = BTreeMap::new();
        while let Some(answer) = stream.message().await.map_err(answer_failed)? {
            by_index.insert(answer.index, answer.text);
        }
        Ok(by_index.into_values().collect())
    };
    tokio::time::timeout(timeout, collect).await.map_err(|_| {
        failed(RpcError::local(
            "teacher",
            addr,
            "Answer",
            tonic::Code::DeadlineExceeded,
            format!("no complete answer within {timeout:?}"),
        ))
    })?
}

/// Student answers labelled 1 and teacher answers labelled 0, row by row.
pub fn labelled_examples(
    rows: &[Row],
    student: &[Vec<String>],
    teacher: &[Vec<String>],
) -> Vec<LabelledResponse> {
    let mut out = Vec::new();
    for ((row, s), t) in rows.iter().zip(student).zip(teacher) {
        let question = Arc::new(row.clone());
        for (answers, from_student) in [(s, true), (t, false)] {
            out.extend(answers.iter().map(|a| LabelledResponse {
                question: question.clone(),
                response: a.clone(),
                from_student,
            }));
        }
    }
    out
}

/// Splits examples into training and held-out sets by question, so that held-out accuracy is
/// measured on questions D never trained on: `fraction` of the questions (at least one when
/// the fraction is positive and there are two or more), chosen with `seed`.
pub fn split_held_out(
    examples: Vec<LabelledResponse>,
    fraction: f64,
    seed: u64,
) -> (Vec<LabelledResponse>, Vec<LabelledResponse>) {
    let mut ids: Vec<String> = examples.iter().map(|e| e.question.id.clone()).collect();
    ids.sort();
    ids.dedup();
    let mut n_held = (fraction.clamp(0.0, 1.0) * ids.len() as f64).round() as usize;
    if fraction > 0.0 && ids.len() >= 2 {
        n_held = n_held.clamp(1, ids.len() - 1);
    }
    ids.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let held: std::collections::HashSet<&String> = ids[..n_held].iter().collect();
    examples
        .into_iter()
        .partition(|e| !held.contains(&e.question.id))
}

/// Everything `ril discriminator pretrain` needs. `discriminator.init` is the student
/// checkpoint (D starts from it, and the student answers are sampled from it);
/// `discriminator.checkpoint_dir` is the output (required), and with `discriminator.resume`
/// an interrupted pre-training continues there. `discriminator.lr` is the starting learning
/// rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainOptions {
    pub discriminator: DiscriminatorOptions,
    /// A dataset directory (its train split) or file.
    pub data: PathBuf,
    /// Teacher servers (host:port) asked for answers the rows do not carry.
    #[serde(default)]
    pub teachers: Vec<String>,
    #[serde(default = "default_answers")]
    pub n_student_answers: usize,
    #[serde(default = "default_answers")]
    pub n_teacher_answers: usize,
    /// Longest student answer sampled.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Use only the first this many questions.
    #[serde(default)]
    pub max_questions: Option<usize>,
    #[serde(default = "default_steps")]
    pub steps: u64,
    /// Overrides `steps`: this many passes over the training examples.
    #[serde(default)]
    pub epochs: Option<f64>,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "default_min_lr")]
    pub min_lr: f64,
    #[serde(default = "default_held_out_fraction")]
    pub held_out_fraction: f64,
    #[serde(default = "default_eval_every")]
    pub eval_every: u64,
    /// Student answers sampled at once.
    #[serde(default = "default_generation_batch_size")]
    pub generation_batch_size: usize,
    /// Per teacher request, in seconds (a teacher generates on a cache miss).
    #[serde(default = "default_teacher_timeout_secs")]
    pub teacher_timeout_secs: f64,
    #[serde(default)]
    pub seed: u64,
}

fn default_answers() -> usize {
    16
}
fn default_max_new_tokens() -> usize {
    256
}
fn default_steps() -> u64 {
    1000
}
fn default_batch_size() -> usize {
    32
}
fn default_min_lr() -> f64 {
    1e-6
}
fn default_held_out_fraction() -> f64 {
    0.1
}
fn default_eval_every() -> u64 {
    100
}
fn default_generation_batch_size() -> usize {
    16
}
fn default_teacher_timeout_secs() -> f64 {
    600.0
}

impl PretrainOptions {
    /// The paper's defaults: D from `student`, answers for the rows of `data`, output in `out`.
    pub fn new(
        student: impl Into<PathBuf>,
        data: impl Into<PathBuf>,
        out: impl Into<PathBuf>,
    ) -> Self {
        let mut discriminator = DiscriminatorOptions::new(student);
        discriminator.checkpoint_dir = Some(out.into());
        discriminator.save_every = 0;
        Self {
            discriminator,
            data: data.into(),
            teachers: Vec::new(),
            n_student_answers: default_answers(),
            n_teacher_answers: default_answers(),
            max_new_tokens: default_max_new_tokens(),
            max_questions: None,
            steps: default_steps(),
            epochs: None,
            batch_size: default_batch_size(),
            min_lr: default_min_lr(),
            held_out_fraction: default_held_out_fraction(),
            eval_every: default_eval_every(),
            generation_batch_size: default_generation_batch_size(),
            teacher_timeout_secs: default_teacher_timeout_secs(),
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.discriminator.validate()?;
        if self.discriminator.checkpoint_dir.is_none() {
            return Err(DiscriminatorError::config(
                "discriminator.checkpoint_dir",
                "is required: it is where the pre-trained discriminator goes (--out)",
            ));
        }
        if self.discriminator.frozen {
            return Err(DiscriminatorError::config(
                "discriminator.frozen",
                "a frozen discriminator cannot be pre-trained",
            ));
        }
        if self.n_student_answers == 0 || self.n_teacher_answers == 0 {
            return Err(DiscriminatorError::config(
                "n_student_answers",
                "and n_teacher_answers must be at least 1",
            ));
        }
        if !(0.0..1.0).contains(&self.held_out_fraction) {
            return Err(DiscriminatorError::config(
                "held_out_fraction",
                "must be in [0, 1)",
            ));
        }
        if let Some(e) = self.epochs
            && !(e.is_finite() && e > 0.0)
        {
            return Err(DiscriminatorError::config(
                "epochs",
                "must be finite and > 0",
            ));
        }
        if !(self.teacher_timeout_secs.is_finite() && self.teacher_timeout_secs > 0.0) {
            return Err(DiscriminatorError::config(
                "teacher_timeout_secs",
                "must be finite and > 0",
            ));
        }
        Ok(())
    }

    /// The loop's schedule for `n_train` training examples.
    pub fn schedule(&self, n_train: usize) -> PretrainSchedule {
        let steps = match self.epochs {
            Some(e) => ((e * n_train as f64) / self.batch_size.max(1) as f64)
                .ceil()
                .max(1.0) as u64,
            None => self.steps,
        };
        PretrainSchedule {
            steps,
            batch_size: self.batch_size,
            lr: self.discriminator.lr,
            min_lr: self.min_lr,
            eval_every: self.eval_every,
            save_every: self.discriminator.save_every,
            seed: self.seed,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ExampleLine {
    question_id: String,
    response: String,
    from_student: bool,
}

fn save_examples(path: &Path, examples: &[LabelledResponse]) -> Result<()> {
    let mut text = Vec::new();
    for e in examples {
        let line = ExampleLine {
            question_id: e.question.id.clone(),
            response: e.response.clone(),
            from_student: e.from_student,
        };
        serde_json::to_writer(&mut text, &line).map_err(|e| DiscriminatorError::Checkpoint {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        text.write_all(b"\n")
            .map_err(|e| DiscriminatorError::io(path, e))?;
    }
    ril_common::fs::write_atomic(path, &text)?;
    Ok(())
}

fn load_examples(path: &Path, rows: &[Row]) -> Result<Vec<LabelledResponse>> {
    let by_id: HashMap<&str, Arc<Row>> = rows
        .iter()
        .map(|r| (r.id.as_str(), Arc::new(r.clone())))
        .collect();
    let text = std::fs::read_to_string(path).map_err(|e| DiscriminatorError::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let bad = |reason: String| DiscriminatorError::Checkpoint {
                path: path.to_path_buf(),
                reason: format!("line {}: {reason}", i + 1),
            };
            let line: ExampleLine = serde_json::from_str(l).map_err(|e| bad(e.to_string()))?;
            let question = by_id.get(line.question_id.as_str()).ok_or_else(|| {
                bad(format!(
                    "question {:?} is not in the dataset any more",
                    line.question_id
                ))
            })?;
            Ok(LabelledResponse {
                question: question.clone(),
                response: line.response,
                from_student: line.from_student,
            })
        })
        .collect()
}

/// The whole pre-training: read the rows, sample the student's answers, gather the teachers',
/// split off held-out questions, train D from the student checkpoint (or continue an
/// interrupted run in the output directory), save it there. The examples are saved too
/// ([`EXAMPLES_FILE`]) and reused by a resumed run.
pub async fn run_pretrain(
    options: PretrainOptions,
    device: Device,
    security: &ril_proto::security::Security,
    mut on_event: impl FnMut(PretrainEvent) + Send + 'static,
) -> Result<PretrainReport> {
    options.validate()?;
    info!(device = %ril_model::device::describe(&device), "discriminator pre-training");
    let out = options
        .discriminator
        .checkpoint_dir
        .clone()
        .expect("validated");
    std::fs::create_dir_all(&out).map_err(|e| DiscriminatorError::io(&out, e))?;
    let file = split_file(&options.data, ril_data::Split::Train)?;
    let (mut rows, _) = read_all(&file, ReadOptions::default())?;
    if let Some(max) = options.max_questions {
        rows.truncate(max);
    }
    if rows.is_empty() {
        return Err(DiscriminatorError::config(
            "data",
            format!("{} has no rows", file.display()),
        ));
    }
    let examples_path = out.join(EXAMPLES_FILE);
    let examples = if options.discriminator.resume && examples_path.is_file() {
        info!(path = %examples_path.display(), "reusing the saved pre-training examples");
        load_examples(&examples_path, &rows)?
    } else {
        let student_dir = options.discriminator.init.clone();
        let (student_rows, gen_device) = (rows.clone(), device.clone());
        let (n, max_new, seed, batch) = (
            options.n_student_answers,
            options.max_new_tokens,
            options.seed,
            options.generation_batch_size,
        );
        let student = tokio::task::spawn_blocking(move || {
            let bundle = Bundle::load(&student_dir, Head::LanguageModel, &gen_device, DType::F32)?;
            info!(
                questions = student_rows.len(),
                n, "sampling the student's answers"
            );
            student_answers(&bundle, &student_rows, n, max_new, seed, batch)
        });
        let timeout = Duration::from_secs_f64(options.teacher_timeout_secs);
        let teacher = teacher_answers(
            &rows,
            &options.teachers,
            options.n_teacher_answers,
            timeout,
            security,
        );
        let (student, teacher) = tokio::join!(student, teacher);
        let student = student.map_err(|e| DiscriminatorError::Task(e.to_string()))??;
        let teacher = teacher?;
        let examples = labelled_examples(&rows, &student, &teacher);
        save_examples(&examples_path, &examples)?;
        examples
    };
    let (train, held_out) = split_held_out(examples, options.held_out_fraction, options.seed);
    let schedule = options.schedule(train.len());
    info!(
        train = train.len(),
        held_out = held_out.len(),
        steps = schedule.steps,
        resume = latest_checkpoint(&out)?.is_some() && options.discriminator.resume,
        "pre-training the discriminator"
    );
    let d_options = options.discriminator.clone();
    tokio::task::spawn_blocking(move || {
        let mut model = DiscriminatorModel::load(&d_options, &device)?;
        if model.step() > schedule.steps {
            warn!(
                step = model.step(),
                steps = schedule.steps,
                "the discriminator in the output directory is already past the requested steps"
            );
        }
        pretrain(
            &mut model,
            &train,
            &held_out,
            &schedule,
            d_options.checkpoint_dir.as_deref(),
            &mut on_event,
        )
    })
    .await
    .map_err(|e| DiscriminatorError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_each_epoch_once_and_depend_only_on_the_step() {
        let n = 10;
        let mut seen: Vec<usize> = (0..5).flat_map(|s| batch_indices(n, 2, 7, s)).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(batch_indices(n, 3, 7, 4), batch_indices(n, 3, 7, 4));
        // A batch straddling two epochs takes the end of one and the start of the next.
        let straddle = batch_indices(n, 4, 7, 2);
        assert_eq!(straddle.len(), 4);
        assert_ne!(batch_indices(n, 10, 7, 0), batch_indices(n, 10, 7, 1));
    }

    #[test]
    fn the_learning_rate_decays_linearly() {
        let s = PretrainSchedule {
            steps: 11,
            batch_size: 1,
            lr: 1e-5,
            min_lr: 1e-6,
            eval_every: 0,
            save_every: 0,
            seed: 0,
        };
        assert_eq!(s.lr_at(0), 1e-5);
        assert!((s.lr_at(10) - 1e-6).abs() < 1e-18);
        assert!((s.lr_at(5) - 5.5e-6).abs() < 1e-18);
    }

    #[test]
    fn round_robin_interleaves_teachers() {
        let lists = vec![
            vec!["a1".to_string(), "a2".into(), "a3".into()],
            vec!["b1".to_string()],
        ];
        assert_eq!(round_robin(lists.clone(), 3), ["a1", "b1", "a2"]);
        assert_eq!(round_robin(lists, 10), ["a1", "b1", "a2", "a3"]);
    }

    #[test]
    fn pretrain_options_parse_with_defaults() {
        let o: PretrainOptions = toml::from_str(
            "data = \"d\"\nteachers = [\"t:1\"]\n[discriminator]\ninit = \"s\"\ncheckpoint_dir = \"o\"",
        )
        .unwrap();
        assert_eq!(o.n_student_answers, 16);
        assert_eq!(o.n_teacher_answers, 16);
        o.validate().unwrap();
        assert_eq!(o.schedule(100).steps, 1000);
        let o = PretrainOptions {
            epochs: Some(2.0),
            ..o
        };
        assert_eq!(o.schedule(100).steps, 7);
    }
}
