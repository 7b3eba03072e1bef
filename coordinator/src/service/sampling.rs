//! Answers for human comparisons, sampled by idle workers: the control plane runs no model.
//! A labeler's NextComparison queues a [`SampleRequest`]; an idle worker gets it with its next
//! NextAssignment poll, samples one answer per seed from the checkpoint, and returns them with
//! SubmitSamples; the waiting NextComparison then stores the comparison. A request no worker
//! answers within [`ANSWER_TIMEOUT`] is dropped and the labeler told to try again.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use liandan_proto::v1::SampleRequest;
use tokio::sync::oneshot;
use tonic::Status;

/// Longest a labeler waits for a worker's answers.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// The answers a worker returned, or why it could not sample.
type Answers = Result<Vec<String>, String>;

#[derive(Debug)]
struct Pending {
    request: SampleRequest,
    /// The worker it was handed to (only it may answer).
    taken_by: Option<u64>,
    reply: oneshot::Sender<Answers>,
}

/// Sampling requests waiting for, or at, a worker.
#[derive(Debug, Default)]
pub(super) struct Sampling {
    next_id: AtomicU64,
    inner: Mutex<(VecDeque<u64>, HashMap<u64, Pending>)>,
}

impl Sampling {
    /// Queues `request` (its id is set here) and waits for a worker's answers.
    ///
    /// # Errors
    /// UNAVAILABLE when no worker answered in time; FAILED_PRECONDITION when the worker could
    /// not sample (the checkpoint did not load, say).
    pub async fn ask(&self, mut request: SampleRequest) -> Result<Vec<String>, Status> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        request.request_id = id;
        let (tx, rx) = oneshot::channel();
        {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            g.0.push_back(id);
            g.1.insert(id, Pending { request, taken_by: None, reply: tx });
        }
        let answers = tokio::time::timeout(ANSWER_TIMEOUT, rx).await;
        let forget = || {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            g.0.retain(|x| *x != id);
            g.1.remove(&id)
        };
        match answers {
            Ok(Ok(Ok(a))) => Ok(a),
            Ok(Ok(Err(why))) => Err(Status::failed_precondition(format!("the worker could not sample answers: {why}"))),
            _ => {
                let taken = forget().and_then(|p| p.taken_by);
                Err(Status::unavailable(match taken {
                    Some(w) => format!("worker {w} did not return the sampled answers within {} s; try again", ANSWER_TIMEOUT.as_secs()),
                    None => format!("no idle worker took the sampling request within {} s (answers are sampled by idle workers); try again", ANSWER_TIMEOUT.as_secs()),
                }))
            }
        }
    }

    /// The oldest waiting request, handed to `worker` (None: nothing to sample).
    pub fn take(&self, worker: u64) -> Option<SampleRequest> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (queue, pending) = &mut *g;
        while let Some(id) = queue.pop_front() {
            if let Some(p) = pending.get_mut(&id) {
                p.taken_by = Some(worker);
                return Some(p.request.clone());
            }
        }
        None
    }

    /// A worker's answers to request `id`.
    ///
    /// # Errors
    /// NOT_FOUND for an unknown (or timed-out) request, PERMISSION_DENIED when it went to another
    /// worker.
    pub fn answer(&self, worker: u64, id: u64, answers: Answers) -> Result<(), Status> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match g.1.get(&id) {
            None => return Err(Status::not_found(format!("sampling request {id} is not waiting (answered, or timed out)"))),
            Some(p) if p.taken_by != Some(worker) => return Err(Status::permission_denied(format!("sampling request {id} was not given to worker {worker}"))),
            Some(_) => {}
        }
        if let Some(p) = g.1.remove(&id) {
            let _ = p.reply.send(answers);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_goes_to_one_worker_and_only_it_answers() {
        let s = std::sync::Arc::new(Sampling::default());
        let asker = {
            let s = s.clone();
            tokio::spawn(async move { s.ask(SampleRequest { prompt: "p".into(), seeds: vec![1, 2], ..Default::default() }).await })
        };
        let req = loop {
            if let Some(r) = s.take(7) {
                break r;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!((req.prompt.as_str(), req.seeds.as_slice()), ("p", &[1u64, 2][..]));
        assert!(s.take(8).is_none(), "handed out once");
        assert_eq!(s.answer(8, req.request_id, Ok(vec![])).unwrap_err().code(), tonic::Code::PermissionDenied);
        s.answer(7, req.request_id, Ok(vec!["a".into(), "b".into()])).unwrap();
        assert_eq!(asker.await.unwrap().unwrap(), ["a", "b"]);
        assert_eq!(s.answer(7, req.request_id, Ok(vec![])).unwrap_err().code(), tonic::Code::NotFound, "answered once");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_request_times_out() {
        let s = Sampling::default();
        let e = s.ask(SampleRequest::default()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains("no idle worker"), "{}", e.message());
        assert!(s.take(1).is_none(), "the timed-out request is gone");
    }
}
