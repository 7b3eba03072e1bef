//! Human comparisons: a prompt of a job's SFT data and two answers sampled from its newest SFT
//! or PPO checkpoint, labelled once; and their export for a reward phase.

use std::io::Write;
use std::sync::Mutex;

use liandan_proto::v1::Comparison;
use tonic::Status;
use tracing::{info, warn};

use super::CoordinatorService;
use crate::limits;
use crate::spec::{PhaseKind, PhasePlan};
use crate::store::{Store, StoreError};

/// The prompts of the SFT file comparisons are asked from, read once per file.
pub(super) type PromptCache = Mutex<Option<(std::path::PathBuf, std::sync::Arc<Vec<liandan_data::chat::SftExample>>)>>;

/// How comparison answers are sampled (the worker's sampling settings).
const MAX_NEW_TOKENS: u32 = 64;
const TEMPERATURE: f32 = 0.9;
const TOP_K: u32 = 50;
const TOP_P: f32 = 0.95;
/// Prompts tried before giving up on two different answers.
const ATTEMPTS: u64 = 16;

impl CoordinatorService {
    /// A new comparison for `job_id`: a prompt of the job's SFT data and two answers sampled
    /// from its newest SFT, PPO, GRPO or DPO checkpoint, by an idle worker ([`super::sampling`]).
    pub async fn make_comparison(&self, job_id: u64) -> Result<crate::store::NewComparison, Status> {
        let (checkpoint, examples, made) = self.with_store(|s| {
            let Some(_) = s.job(job_id)? else { return Ok(Err(Status::not_found(format!("job {job_id} does not exist")))) };
            let plans: Vec<(crate::store::PhaseRow, PhasePlan)> =
                s.phases(job_id)?.into_iter().filter_map(|p| serde_json::from_str::<PhasePlan>(&p.plan_json).ok().map(|pl| (p, pl))).collect();
            let chat = |k: PhaseKind| matches!(k, PhaseKind::Sft | PhaseKind::Ppo | PhaseKind::Grpo | PhaseKind::Dpo);
            let Some((p, _)) = plans.iter().rev().find(|(p, pl)| chat(pl.kind) && !p.last_checkpoint.is_empty()) else {
                return Ok(Err(Status::failed_precondition(format!("job {job_id} has no chat checkpoint (SFT, PPO, GRPO or DPO) yet to sample answers from"))));
            };
            let Some(examples) = plans.iter().find(|(_, pl)| pl.kind == PhaseKind::Sft).and_then(|(_, pl)| pl.examples.clone()) else {
                return Ok(Err(Status::failed_precondition(format!("job {job_id} has no sft phase whose prompts could be asked"))));
            };
            Ok(Ok((p.last_checkpoint.clone(), examples, s.comparison_counts(job_id)?.0)))
        })??;
        let prompts = self.prompts(&examples).await?;
        // Walk the prompts in a fixed pseudo-random order; skip pairs whose answers are equal.
        for attempt in 0..ATTEMPTS {
            let k = made * ATTEMPTS + attempt;
            let ex = &prompts[(k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 17) as usize % prompts.len()];
            let Some(prompt) = ex.messages.iter().find(|m| m.role == liandan_data::chat::Role::User).map(|m| m.content.clone()) else { continue };
            let request = liandan_proto::v1::SampleRequest {
                request_id: 0,
                checkpoint: checkpoint.clone(),
                prompt: prompt.clone(),
                seeds: vec![2 * k, 2 * k + 1],
                max_new_tokens: MAX_NEW_TOKENS,
                temperature: TEMPERATURE,
                top_k: TOP_K,
                top_p: TOP_P,
            };
            let answers = self.sampling.ask(request).await?;
            let [a, b] = answers.as_slice() else { return Err(Status::internal(format!("a worker returned {} answers for 2 seeds", answers.len()))) };
            if a.trim() != b.trim() && !a.trim().is_empty() && !b.trim().is_empty() {
                return Ok(crate::store::NewComparison {
                    job_id,
                    prompt,
                    task: ex.task.clone().unwrap_or_default(),
                    answer_a: a.trim().into(),
                    answer_b: b.trim().into(),
                    checkpoint,
                });
            }
        }
        Err(Status::resource_exhausted(format!("{checkpoint}: {ATTEMPTS} attempts gave no two different answers")))
    }

    /// The examples of `file`, read (off the async threads) once per file.
    async fn prompts(&self, file: &std::path::Path) -> Result<std::sync::Arc<Vec<liandan_data::chat::SftExample>>, Status> {
        if let Some((f, p)) = self.prompts.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
            && f == file
        {
            return Ok(p.clone());
        }
        let path = file.to_path_buf();
        let read = tokio::task::spawn_blocking(move || liandan_data::chat::read_sft(&path)).await.map_err(|e| Status::internal(e.to_string()))?;
        let prompts = std::sync::Arc::new(read.map_err(|e| Status::failed_precondition(e.to_string()))?);
        *self.prompts.lock().unwrap_or_else(|p| p.into_inner()) = Some((file.to_path_buf(), prompts.clone()));
        Ok(prompts)
    }

    /// A worker's answers to a sampling request.
    pub(super) fn samples(&self, r: liandan_proto::v1::SampleResult) -> Result<(), Status> {
        self.members
            .check(r.worker_id, &r.worker_secret)
            .map_err(|_| Status::permission_denied(format!("worker {}: not registered, or the worker secret is not its own", r.worker_id)))?;
        let answers = if r.error.is_empty() { Ok(r.answers) } else { Err(limits::cut(&r.error, limits::ERROR_CHARS)) };
        if let Ok(a) = &answers
            && let Some(long) = a.iter().find(|x| x.chars().count() > limits::ANSWER_CHARS)
        {
            return Err(Status::invalid_argument(format!("an answer of {} characters; at most {}", long.chars().count(), limits::ANSWER_CHARS)));
        }
        self.sampling.answer(r.worker_id, r.request_id, answers)
    }

    /// The next comparison of a job to label: its oldest open one, or a newly sampled one.
    pub async fn next_comparison_for(&self, job_id: u64) -> Result<Comparison, Status> {
        let open = self.with_store(|s| s.open_comparison(job_id))?;
        let row = match open {
            Some(row) => row,
            None => {
                let new = self.make_comparison(job_id).await?;
                let id = self.with_store(|s| s.insert_comparison(&new))?;
                info!(job = job_id, comparison = id, "new comparison sampled from {}", new.checkpoint);
                crate::store::ComparisonRow { id, new, choice: String::new(), labeler: String::new() }
            }
        };
        let (total, labelled) = self.with_store(|s| s.comparison_counts(job_id))?;
        let n = row.new;
        Ok(Comparison { comparison_id: row.id, job_id, prompt: n.prompt, answer_a: n.answer_a, answer_b: n.answer_b, task: n.task, checkpoint: n.checkpoint, total, labelled })
    }

    /// Labels a comparison once (`a`, `b`, `tie`, `skip`); a refusal is logged and changes nothing.
    pub fn label(&self, id: u64, choice: &str, labeler: &str) -> Result<(), Status> {
        limits::text("labeler", labeler, limits::LABELER_CHARS)?;
        let result = if ["a", "b", "tie", "skip"].contains(&choice) {
            self.with_store(|s| {
                let Some(c) = s.comparison(id)? else { return Ok(Err(Status::not_found(format!("comparison {id} does not exist")))) };
                if !s.label_comparison(c.id, choice, labeler)? {
                    return Ok(Err(Status::failed_precondition(format!("comparison {id} was already labelled ('{}' by '{}')", c.choice, c.labeler))));
                }
                Ok(Ok(()))
            })?
        } else {
            Err(Status::invalid_argument(format!("choice must be a, b, tie or skip, got '{choice}'")))
        };
        match &result {
            Ok(()) => info!(comparison = id, choice, labeler, "comparison labelled"),
            Err(e) => warn!(comparison = id, "label refused: {}", e.message()),
        }
        result
    }
}

/// Writes the comparisons labelled so far (with a winner) to `labelled_comparisons.jsonl` in the
/// phase's checkpoint directory, once: later generations of the phase train on the same set.
pub(super) fn export_labelled(s: &Store, p: &crate::store::PhaseRow) -> Result<std::path::PathBuf, StoreError> {
    let path = std::path::Path::new(&p.checkpoint_dir).join("labelled_comparisons.jsonl");
    if path.exists() {
        return Ok(path);
    }
    let tmp = path.with_extension("jsonl.tmp");
    let io = |e: std::io::Error| StoreError::Io(format!("{}: {e}", path.display()));
    std::fs::create_dir_all(&p.checkpoint_dir).map_err(io)?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    // A page at a time: the export never holds every comparison in memory.
    let mut after = 0;
    loop {
        let page = s.decided_comparisons(after, 500)?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for c in &page {
            let n = &c.new;
            let (chosen, rejected) = if c.choice == "a" { (&n.answer_a, &n.answer_b) } else { (&n.answer_b, &n.answer_a) };
            let line = serde_json::json!({
                "prompt": n.prompt, "chosen": chosen, "rejected": rejected, "label_source": "human",
                "task": n.task, "comparison_id": c.id, "labeler": c.labeler, "sampled_from": n.checkpoint,
            });
            writeln!(out, "{line}").map_err(io)?;
        }
    }
    out.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(path)
}
