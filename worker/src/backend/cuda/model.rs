//! The GPT-2 model on the CUDA backend: the same forward, loss and backward as
//! [`crate::model::gpt::Gpt`], op for op, on device buffers allocated once.
//!
//! Mixed precision: parameters, gradients, optimizer moments and activations are f32 (the
//! master copy; on the bf16 path the inner LayerNorms' and GELU's outputs are kept as bf16 only,
//! as nothing reads them in f32); with [`Precision::Bf16`] the optimizer also keeps a bf16 copy of
//! the parameters and the matmuls run on cuBLASLt with bf16 operands and f32 accumulation. The
//! activation operands arrive as bf16 from the kernel that wrote them (the LayerNorms forward and
//! backward, the attention forward and backward, `gelu_forward`, the fused classifier's logits
//! gradient), except the GELU backward's output `dfch`, written in f32 by cuBLASLt's DGELU
//! epilogue and cast once per layer.
//! [`Precision::F32`] runs the matmuls in f32, which is what the CPU comparison uses.
//! Attention keeps one log-sum-exp per query row instead of the `(B,NH,T,T)` probabilities; it
//! runs on the tensor-core kernels for bf16 where they apply, else on the f32 reference kernels
//! ([`AttentionKernels`], changed with [`CudaGpt::set_attention`]).

use std::sync::Arc;
use std::time::Instant;

use crate::error::EngineError;
use crate::model::config::GptConfig;
use crate::model::gpt::validate_targets;
use crate::model::params::{ParamKind as K, ParamLayout};
use crate::model::profile::{Cost, OpProfile};

use super::cost;
use super::device::{CudaDevice, DevBuf, StagingBuf, View};
use super::error::Result;
use super::flash::{self, AttentionKernels};
use super::matmul::Precision;
use super::ops::{self, Act, Bf16Scratch};

/// Forward activations, laid out as the CPU's [`crate::model::acts::Activations`] (per-layer
/// buffers hold `L` slots of `maxB·maxT·width`).
#[derive(Debug)]
struct Acts {
    encoded: DevBuf<f32>,
    ln1: DevBuf<f32>,
    ln1_mean: DevBuf<f32>,
    ln1_rstd: DevBuf<f32>,
    qkv: DevBuf<f32>,
    /// `(L, B, NH, T)` log-sum-exp of each query row's scores (replaces the CPU's `att`).
    lse: DevBuf<f32>,
    atty: DevBuf<f32>,
    residual2: DevBuf<f32>,
    ln2: DevBuf<f32>,
    ln2_mean: DevBuf<f32>,
    ln2_rstd: DevBuf<f32>,
    fch: DevBuf<f32>,
    fch_gelu: DevBuf<f32>,
    residual3: DevBuf<f32>,
    lnf: DevBuf<f32>,
    lnf_mean: DevBuf<f32>,
    lnf_rstd: DevBuf<f32>,
    logits: DevBuf<f32>,
    losses: DevBuf<f32>,
    proj: DevBuf<f32>,
    /// bf16 copies of `ln1`, `ln2` and `lnf` (bits in u16), written by the LayerNorm kernels
    /// on the bf16 path: the operands of the matmuls after them, forward and backward, with
    /// no cast kernel. One element each on the f32 path. On the bf16 path nothing reads the f32
    /// `ln1` and `ln2` (one element each, never written); `lnf` stays f32 too, the hidden state
    /// the reward and value heads read.
    ln1_bf16: DevBuf<u16>,
    ln2_bf16: DevBuf<u16>,
    lnf_bf16: DevBuf<u16>,
    /// bf16 copies of `atty` (written by the attention forward next to its f32 output, which
    /// the attention backward reads) and `fch_gelu` (written by `gelu_forward`, whose f32
    /// `fch_gelu` nothing reads on this path: one element, never written) on the bf16 path,
    /// read by the next matmul and again by the backward's weight-gradient gemms. One element
    /// each on the f32 path.
    atty_bf16: DevBuf<u16>,
    fch_gelu_bf16: DevBuf<u16>,
}

/// Activation gradients (one layer's worth, reused), as the CPU's `GradActivations`.
#[derive(Debug)]
struct GradActs {
    dresidual: DevBuf<f32>,
    dln: DevBuf<f32>,
    dqkv: DevBuf<f32>,
    /// `(B, NH, T)`: Σ_d dout·out per query row, the attention backward's softmax term.
    delta: DevBuf<f32>,
    datty: DevBuf<f32>,
    dfch: DevBuf<f32>,
    dfch_gelu: DevBuf<f32>,
    /// bf16 copy of `dresidual` on the bf16 path, written by each LayerNorm backward: the
    /// gradient operand of the matmul backward after it. One element on the f32 path.
    dresidual_bf16: DevBuf<u16>,
    /// bf16 copy of `dqkv` on the bf16 path, written by the attention backward: the gradient
    /// operand of the QKV matmul's backward. One element on the f32 path.
    dqkv_bf16: DevBuf<u16>,
}

/// A GPT-2 model with its training buffers on one GPU.
#[derive(Debug)]
pub struct CudaGpt {
    pub dev: Arc<CudaDevice>,
    pub config: GptConfig,
    pub layout: ParamLayout,
    pub precision: Precision,
    /// The attention kernels forward and backward run ([`AttentionKernels::default_for`]).
    attention: AttentionKernels,
    /// f32 master parameters, in [`ParamLayout`] order.
    pub params: DevBuf<f32>,
    /// bf16 copy of `params` (bits in u16), refreshed by the optimizer and by `set_params`.
    pub params_bf16: DevBuf<u16>,
    /// Gradients, same layout; accumulated by `backward`, cleared by `zero_grad`.
    pub grads: DevBuf<f32>,
    /// The views of `grads` each gradient bucket covers ([`ParamLayout::bucket`]), made once.
    bucket_views: Vec<Vec<View>>,
    acts: Acts,
    gacts: GradActs,
    inputs: DevBuf<u32>,
    targets: DevBuf<i32>,
    weights: DevBuf<f32>,
    /// Page-locked staging of `inputs`, `targets` and `weights`: their uploads do not wait.
    stage_inputs: StagingBuf<u32>,
    stage_targets: StagingBuf<i32>,
    stage_weights: StagingBuf<f32>,
    /// `[0]`: the losses of [`CudaGpt::loss_deferred`] since the last [`CudaGpt::take_loss`]
    /// (or `zero_grad`); `[1]`: the one [`CudaGpt::loss`] reads back.
    loss_acc: DevBuf<f64>,
    /// bf16 casts of matmul activation operands, `maxB·maxT·max(4C, Vp)` each.
    scratch_a: DevBuf<u16>,
    scratch_b: DevBuf<u16>,
    /// Partial column sums (bias and LayerNorm parameter gradients).
    partial: DevBuf<f32>,
    pub(crate) max_b: usize,
    pub(crate) max_t: usize,
    shape: Option<(usize, usize)>,
    dlogits_ready: bool,
    /// The last `loss(.., true)` left the logits' gradient as bf16 in `scratch_a` (the fused
    /// classifier of [`Precision::Bf16`]) rather than over the f32 logits.
    dlogits_bf16: bool,
    /// Per-op time when set (`liandan bench train --profile`): each op is followed by a device
    /// synchronisation, so the times include launch latency and the pipeline is serialised.
    pub profile: Option<OpProfile>,
}

/// Runs `f` and, when profiling, waits for the device and charges the time to `op`.
/// `cost` is the op's work for the roofline ([`super::cost`]).
pub(crate) fn timed(prof: &mut Option<OpProfile>, dev: &CudaDevice, op: &'static str, cost: Cost, f: impl FnOnce() -> Result<()>) -> Result<()> {
    match prof {
        None => f(),
        Some(p) => {
            let t0 = Instant::now();
            f()?;
            dev.sync()?;
            p.add_cost(op, t0.elapsed(), cost);
            Ok(())
        }
    }
}

impl CudaGpt {
    /// A model with zeroed parameters and buffers for batches up to `max_b × max_t`.
    ///
    /// # Errors
    /// The config is invalid, `max_t` exceeds `n_positions`, or the device is out of memory.
    pub fn new(dev: Arc<CudaDevice>, config: GptConfig, max_b: usize, max_t: usize, precision: Precision) -> Result<Self> {
        config.validate()?;
        if max_b == 0 || max_t == 0 || max_t > config.n_positions {
            return Err(EngineError::InvalidConfig { field: "seq_len", reason: format!("B={max_b}, T={max_t}: need B >= 1 and T in 1..={}", config.n_positions) }.into());
        }
        let layout = ParamLayout::new(&config);
        let (c, l, nh, vp) = (config.n_embd, config.n_layer, config.n_head, config.padded_vocab_size);
        let bt = max_b * max_t;
        let z = |n: usize| dev.alloc::<f32>(n);
        let acts = Acts {
            encoded: z(bt * c)?,
            ln1: z(if precision == Precision::F32 { l * bt * c } else { 1 })?,
            ln1_mean: z(l * bt)?,
            ln1_rstd: z(l * bt)?,
            qkv: z(l * bt * 3 * c)?,
            lse: z(l * max_b * nh * max_t)?,
            atty: z(l * bt * c)?,
            residual2: z(l * bt * c)?,
            ln2: z(if precision == Precision::F32 { l * bt * c } else { 1 })?,
            ln2_mean: z(l * bt)?,
            ln2_rstd: z(l * bt)?,
            fch: z(l * bt * 4 * c)?,
            fch_gelu: z(if precision == Precision::F32 { l * bt * 4 * c } else { 1 })?,
            residual3: z(l * bt * c)?,
            lnf: z(bt * c)?,
            lnf_mean: z(bt)?,
            lnf_rstd: z(bt)?,
            logits: z(bt * vp)?,
            losses: z(bt)?,
            proj: z(bt * c)?,
            ln1_bf16: dev.alloc::<u16>(if precision == Precision::Bf16 { l * bt * c } else { 1 })?,
            ln2_bf16: dev.alloc::<u16>(if precision == Precision::Bf16 { l * bt * c } else { 1 })?,
            lnf_bf16: dev.alloc::<u16>(if precision == Precision::Bf16 { bt * c } else { 1 })?,
            atty_bf16: dev.alloc::<u16>(if precision == Precision::Bf16 { l * bt * c } else { 1 })?,
            fch_gelu_bf16: dev.alloc::<u16>(if precision == Precision::Bf16 { l * bt * 4 * c } else { 1 })?,
        };
        let gacts = GradActs {
            dresidual: z(bt * c)?,
            dln: z(bt * c)?,
            dqkv: z(bt * 3 * c)?,
            delta: z(max_b * nh * max_t)?,
            datty: z(bt * c)?,
            dfch: z(bt * 4 * c)?,
            dfch_gelu: z(bt * 4 * c)?,
            dresidual_bf16: dev.alloc::<u16>(if precision == Precision::Bf16 { bt * c } else { 1 })?,
            dqkv_bf16: dev.alloc::<u16>(if precision == Precision::Bf16 { bt * 3 * c } else { 1 })?,
        };
        let scratch = match precision {
            Precision::Bf16 => bt * (4 * c).max(vp),
            Precision::F32 => 1,
        };
        let attention = AttentionKernels::default_for(&dev, precision, c / nh);
        let grads = z(layout.len())?;
        let bucket_views = (0..layout.buckets()).map(|slot| layout.bucket(slot).into_iter().map(|r| grads.view(r.start, r.len())).collect()).collect();
        Ok(CudaGpt {
            attention,
            params: z(layout.len())?,
            params_bf16: dev.alloc::<u16>(if precision == Precision::Bf16 { layout.len() } else { 1 })?,
            grads,
            bucket_views,
            acts,
            gacts,
            inputs: dev.alloc::<u32>(bt)?,
            targets: dev.alloc::<i32>(bt)?,
            weights: z(bt)?,
            stage_inputs: dev.staging(bt)?,
            stage_targets: dev.staging(bt)?,
            stage_weights: dev.staging(bt)?,
            loss_acc: dev.alloc::<f64>(2)?,
            scratch_a: dev.alloc::<u16>(scratch)?,
            scratch_b: dev.alloc::<u16>(scratch)?,
            partial: z(ops::partial_len(bt, 4 * c))?,
            dev,
            layout,
            config,
            precision,
            max_b,
            max_t,
            shape: None,
            dlogits_ready: false,
            dlogits_bf16: false,
            profile: None,
        })
    }

    /// The attention kernels the model runs.
    pub fn attention(&self) -> AttentionKernels {
        self.attention
    }

    /// Runs attention on `kernels` from the next forward on (the reference kernels are the
    /// fallback and the comparison for the tensor-core ones).
    ///
    /// # Errors
    /// The kernels cannot run this model's head size on this device.
    pub fn set_attention(&mut self, kernels: AttentionKernels) -> Result<()> {
        kernels.check(&self.dev, self.config.n_embd / self.config.n_head)?;
        self.attention = kernels;
        Ok(())
    }

    /// Copies host parameters (in [`ParamLayout`] order) to the device, and their bf16 copy.
    ///
    /// # Errors
    /// Wrong length, or a failed copy.
    pub fn set_params(&mut self, params: &[f32]) -> Result<()> {
        if params.len() != self.layout.len() {
            return Err(EngineError::BadLength { what: "params", expected: self.layout.len(), got: params.len() }.into());
        }
        self.dev.upload(&self.params, 0, params)?;
        self.refresh_bf16_params()
    }

    /// Rewrites the bf16 copy of the parameters from the f32 master (after the f32 ones were
    /// written other than by AdamW); nothing to do for f32 matmuls.
    pub fn refresh_bf16_params(&self) -> Result<()> {
        if self.precision == Precision::Bf16 {
            ops::cast_to_bf16(&self.dev, self.params_bf16.all(), self.params.all(), self.layout.len())?;
        }
        Ok(())
    }

    /// The parameters, copied to the host.
    pub fn params_to_host(&self) -> Result<Vec<f32>> {
        let mut out = vec![0.0; self.layout.len()];
        self.dev.download(&self.params, 0, &mut out)?;
        Ok(out)
    }

    /// The gradients, copied to the host.
    pub fn grads_to_host(&self) -> Result<Vec<f32>> {
        let mut out = vec![0.0; self.layout.len()];
        self.dev.download(&self.grads, 0, &mut out)?;
        Ok(out)
    }

    /// Logits of the last forward `(B, T, Vp)`, copied to the host (gradients after
    /// `loss(.., true)`, as on the CPU; bf16-rounded with bf16 matmuls, which keep them as bf16).
    pub fn logits_to_host(&self) -> Result<Vec<f32>> {
        let (b, t) = self.shape.ok_or(EngineError::NoForward)?;
        let len = b * t * self.config.padded_vocab_size;
        if self.dlogits_ready && self.dlogits_bf16 {
            let mut bits = vec![0u16; len];
            self.dev.download(&self.scratch_a, 0, &mut bits)?;
            return Ok(bits.iter().map(|&h| f32::from_bits((h as u32) << 16)).collect());
        }
        let mut out = vec![0.0; len];
        self.dev.download(&self.acts.logits, 0, &mut out)?;
        Ok(out)
    }

    /// `len` elements from `offset` of an activation's bf16 copy, on the bf16 path.
    fn bf16_copy(&self, buf: &DevBuf<u16>, offset: usize, len: usize) -> Option<View> {
        (self.precision == Precision::Bf16).then(|| buf.view(offset, len))
    }

    /// An activation kept in f32 on the f32 path and only as bf16 on the bf16 path (the inner
    /// LayerNorms' outputs, GELU's output), `len` from `offset`, as the kernel that writes it
    /// sees it: `(f32, bf16)`, one of the two.
    fn out_views(&self, f32s: &DevBuf<f32>, bf16: &DevBuf<u16>, offset: usize, len: usize) -> (Option<View>, Option<View>) {
        match self.operand_view(f32s, bf16, offset, len) {
            Act::F32(v) => (Some(v), None),
            Act::Bf16(b) => (None, Some(b)),
        }
    }

    /// An activation of [`CudaGpt::out_views`] as the matmuls after it read it (and the one
    /// place that decides which of the two it is kept as).
    fn operand_view(&self, f32s: &DevBuf<f32>, bf16: &DevBuf<u16>, offset: usize, len: usize) -> Act {
        match self.precision {
            Precision::F32 => Act::F32(f32s.view(offset, len)),
            Precision::Bf16 => Act::Bf16(bf16.view(offset, len)),
        }
    }

    /// An activation as a matmul reads it: its bf16 copy when there is one.
    fn act(&self, f32_view: View, bf16: Option<View>) -> Act {
        bf16.map_or(Act::F32(f32_view), Act::Bf16)
    }

    /// Clears the gradients and the deferred loss: the start of a step.
    pub fn zero_grad(&mut self) -> Result<()> {
        self.dev.zero(&self.loss_acc, 0, 1)?;
        self.dev.zero(&self.grads, 0, self.grads.len())?;
        // Marked too, so a step with no backward sums zeros, not what the memset overwrites.
        (0..self.layout.buckets()).try_for_each(|slot| self.mark_bucket(slot))
    }

    pub(super) fn p(&self, kind: K, l: usize) -> View {
        let r = self.layout.layer_range(kind, l);
        self.params.view(r.start, r.len())
    }

    pub(super) fn pb(&self, kind: K, l: usize) -> View {
        if self.precision == Precision::F32 {
            return self.params_bf16.view(0, 0);
        }
        let r = self.layout.layer_range(kind, l);
        self.params_bf16.view(r.start, r.len())
    }

    fn g(&self, kind: K, l: usize) -> View {
        let r = self.layout.layer_range(kind, l);
        self.grads.view(r.start, r.len())
    }

    fn scratch(&self) -> Bf16Scratch {
        Bf16Scratch { a: self.scratch_a.all(), b: self.scratch_b.all() }
    }

    /// Forward pass of `inputs` `(B, T)` (the CPU's [`crate::model::gpt::Gpt::forward`]).
    ///
    /// # Errors
    /// The batch does not fit, a token is outside the vocabulary, or a launch fails.
    pub fn forward(&mut self, inputs: &[u32], b: usize, t: usize) -> Result<()> {
        if b == 0 || t == 0 || b > self.max_b || t > self.max_t {
            return Err(EngineError::BatchTooLarge { b, t, max_b: self.max_b, max_t: self.max_t }.into());
        }
        if inputs.len() != b * t {
            return Err(EngineError::BadLength { what: "inputs", expected: b * t, got: inputs.len() }.into());
        }
        let v = self.config.vocab_size;
        if let Some((i, &tok)) = inputs.iter().enumerate().find(|(_, tok)| **tok as usize >= v) {
            return Err(EngineError::TokenOutOfRange { what: "inputs", position: i, token: tok as i64, vocab: v }.into());
        }
        self.stage_inputs.upload(&self.inputs, 0, inputs)?;
        self.shape = Some((b, t));
        self.dlogits_ready = false;
        let mut prof = self.profile.take();
        let r = self.forward_ops(&mut prof, b, t);
        self.profile = prof;
        r
    }

    fn forward_ops(&self, prof: &mut Option<OpProfile>, b: usize, t: usize) -> Result<()> {
        let (dev, a, prec, sc) = (&*self.dev, &self.acts, self.precision, self.scratch());
        let cfg = &self.config;
        let (c, nh, vp) = (cfg.n_embd, cfg.n_head, cfg.padded_vocab_size);
        let n = b * t;
        let cap = self.max_b * self.max_t;
        let (pc, p1, p3, p4, pl) = (cap * c, cap, cap * 3 * c, cap * 4 * c, self.max_b * nh * self.max_t);
        let lv = |buf: &DevBuf<f32>, l: usize, per: usize, len: usize| buf.view(l * per, len);
        let lnfb = self.bf16_copy(&a.lnf_bf16, 0, n * c);

        timed(prof, dev, "fwd.encoder", cost::encoder_forward(b, t, c), || {
            ops::encoder_forward(dev, a.encoded.view(0, n * c), self.inputs.view(0, n), self.p(K::Wte, 0), self.p(K::Wpe, 0), b, t, c, 0)
        })?;
        // Layer 0's first LayerNorm stands alone; every later one (and the final one) is fused
        // with the residual add before it.
        let (ln1_0, ln1b_0) = self.out_views(&a.ln1, &a.ln1_bf16, 0, n * c);
        timed(prof, dev, "fwd.layernorm", cost::layernorm_forward(n, c, cost::written(ln1_0, ln1b_0)), || {
            ops::layernorm_forward(dev, ln1_0, ln1b_0, a.ln1_mean.view(0, n), a.ln1_rstd.view(0, n), a.encoded.view(0, n * c), self.p(K::Ln1W, 0), self.p(K::Ln1B, 0), n, c)
        })?;
        let lnf = a.lnf.view(0, n * c);
        for l in 0..cfg.n_layer {
            let res_in = if l == 0 { a.encoded.view(0, n * c) } else { lv(&a.residual3, l - 1, pc, n * c) };
            let ln1 = self.operand_view(&a.ln1, &a.ln1_bf16, l * pc, n * c);
            let qkv = lv(&a.qkv, l, p3, n * 3 * c);
            timed(prof, dev, "fwd.matmul", cost::matmul_forward(prec, n, c, 3 * c, true), || {
                ops::matmul_forward(dev, prec, qkv, ln1, self.p(K::QkvW, l), self.pb(K::QkvW, l), Some(self.p(K::QkvB, l)), sc, n, c, 3 * c)
            })?;
            let (atty, atty_b) = (lv(&a.atty, l, pc, n * c), self.bf16_copy(&a.atty_bf16, l * pc, n * c));
            timed(prof, dev, "fwd.attention", cost::attention_forward(b, t, c, nh, cost::written(Some(atty), atty_b)), || {
                flash::attention_forward(dev, self.attention, atty, atty_b, lv(&a.lse, l, pl, b * nh * t), qkv, b, t, c, nh)
            })?;
            let proj = a.proj.view(0, n * c);
            let atty_in = self.act(atty, atty_b);
            timed(prof, dev, "fwd.matmul", cost::matmul_forward(prec, n, c, c, true), || {
                ops::matmul_forward(dev, prec, proj, atty_in, self.p(K::AttProjW, l), self.pb(K::AttProjW, l), Some(self.p(K::AttProjB, l)), sc, n, c, c)
            })?;
            let res2 = lv(&a.residual2, l, pc, n * c);
            let (ln2, ln2b) = self.out_views(&a.ln2, &a.ln2_bf16, l * pc, n * c);
            timed(prof, dev, "fwd.residual_layernorm", cost::residual_layernorm_forward(n, c, cost::written(ln2, ln2b)), || {
                ops::residual_layernorm_forward(
                    dev,
                    res2,
                    ln2,
                    ln2b,
                    lv(&a.ln2_mean, l, p1, n),
                    lv(&a.ln2_rstd, l, p1, n),
                    res_in,
                    proj,
                    self.p(K::Ln2W, l),
                    self.p(K::Ln2B, l),
                    n,
                    c,
                )
            })?;
            let (fch, (fch_gelu, fch_gelu_b)) = (lv(&a.fch, l, p4, n * 4 * c), self.out_views(&a.fch_gelu, &a.fch_gelu_bf16, l * p4, n * 4 * c));
            timed(prof, dev, "fwd.matmul_gelu", cost::matmul_forward_gelu(prec, n, c, 4 * c), || {
                ops::matmul_forward_gelu(
                    dev,
                    prec,
                    fch_gelu,
                    fch_gelu_b,
                    fch,
                    self.operand_view(&a.ln2, &a.ln2_bf16, l * pc, n * c),
                    self.p(K::FcW, l),
                    self.pb(K::FcW, l),
                    self.p(K::FcB, l),
                    sc,
                    n,
                    c,
                    4 * c,
                )
            })?;
            let fch_gelu_in = self.operand_view(&a.fch_gelu, &a.fch_gelu_bf16, l * p4, n * 4 * c);
            timed(prof, dev, "fwd.matmul", cost::matmul_forward(prec, n, 4 * c, c, true), || {
                ops::matmul_forward(dev, prec, proj, fch_gelu_in, self.p(K::FcProjW, l), self.pb(K::FcProjW, l), Some(self.p(K::FcProjB, l)), sc, n, 4 * c, c)
            })?;
            let res3 = lv(&a.residual3, l, pc, n * c);
            // The LayerNorm after this block: the next block's first, or the final one.
            let ((ln, ln_b), mean, rstd, w, bias) = if l + 1 < cfg.n_layer {
                (
                    self.out_views(&a.ln1, &a.ln1_bf16, (l + 1) * pc, n * c),
                    lv(&a.ln1_mean, l + 1, p1, n),
                    lv(&a.ln1_rstd, l + 1, p1, n),
                    self.p(K::Ln1W, l + 1),
                    self.p(K::Ln1B, l + 1),
                )
            } else {
                ((Some(lnf), lnfb), a.lnf_mean.view(0, n), a.lnf_rstd.view(0, n), self.p(K::LnfW, 0), self.p(K::LnfB, 0))
            };
            timed(prof, dev, "fwd.residual_layernorm", cost::residual_layernorm_forward(n, c, cost::written(ln, ln_b)), || {
                ops::residual_layernorm_forward(dev, res3, ln, ln_b, mean, rstd, res2, proj, w, bias, n, c)
            })?;
        }
        timed(prof, dev, "fwd.lm_head", cost::lm_head_forward(prec, n, c, vp), || {
            ops::lm_head_forward(dev, prec, a.logits.view(0, n * vp), self.act(lnf, lnfb), self.p(K::Wte, 0), self.pb(K::Wte, 0), sc, n, c, vp)
        })
    }

    /// The loss `Σ_i w_i·ce_i / denom` of the last forward; with `with_grad`, prepares dlogits
    /// (the CPU's [`crate::model::gpt::Gpt::loss`]). Reads the value back, so it waits for the
    /// forward: a training step uses [`CudaGpt::loss_deferred`] instead.
    ///
    /// # Errors
    /// No forward ran, bad targets or weights, `denom <= 0`, or a launch fails.
    pub fn loss(&mut self, targets: &[i32], weights: Option<&[f32]>, denom: f32, with_grad: bool) -> Result<f32> {
        self.dev.zero(&self.loss_acc, 1, 1)?;
        self.loss_into(1, targets, weights, denom, with_grad)?;
        let mut total = [0.0f64];
        self.dev.download(&self.loss_acc, 1, &mut total)?;
        Ok(total[0] as f32)
    }

    /// `loss(.., true)` whose value is added on the device to the step's sum instead of read
    /// back, so nothing waits for the forward; [`CudaGpt::take_loss`] reads the sum once.
    ///
    /// # Errors
    /// As [`CudaGpt::loss`].
    pub fn loss_deferred(&mut self, targets: &[i32], weights: Option<&[f32]>, denom: f32) -> Result<()> {
        self.loss_into(0, targets, weights, denom, true)
    }

    /// The sum of the deferred losses since the last call (or `zero_grad`), which it resets.
    ///
    /// # Errors
    /// A failed copy (or an earlier kernel's asynchronous error, which surfaces here).
    pub fn take_loss(&mut self) -> Result<f64> {
        let mut total = [0.0f64];
        self.dev.download(&self.loss_acc, 0, &mut total)?;
        self.dev.zero(&self.loss_acc, 0, 1)?;
        Ok(total[0])
    }

    /// Softmax cross-entropy of the last forward, its gradient when `with_grad`, and the
    /// weighted sum over `denom` added to `loss_acc[slot]`.
    fn loss_into(&mut self, slot: usize, targets: &[i32], weights: Option<&[f32]>, denom: f32, with_grad: bool) -> Result<()> {
        let (b, t) = self.shape.ok_or(EngineError::NoForward)?;
        if self.dlogits_ready {
            return Err(EngineError::NoForward.into());
        }
        validate_targets(targets, weights, b * t, self.config.vocab_size)?;
        if !(denom > 0.0 && denom.is_finite()) {
            return Err(EngineError::InvalidConfig { field: "loss denominator", reason: format!("must be positive and finite, got {denom}") }.into());
        }
        let n = b * t;
        let (v, vp) = (self.config.vocab_size, self.config.padded_vocab_size);
        self.stage_targets.upload(&self.targets, 0, targets)?;
        if let Some(w) = weights {
            self.stage_weights.upload(&self.weights, 0, w)?;
        }
        let wv = weights.map(|_| self.weights.view(0, n));
        // With bf16 matmuls the gradient goes straight to bf16, the LM head backward's operand.
        let grad = match (with_grad, self.precision) {
            (false, _) => ops::Grad::None,
            (true, Precision::Bf16) => ops::Grad::Bf16(self.scratch_a.view(0, n * vp)),
            (true, Precision::F32) => ops::Grad::InPlace,
        };
        let mut prof = self.profile.take();
        let (losses, tv) = (self.acts.losses.view(0, n), self.targets.view(0, n));
        let r = timed(&mut prof, &self.dev, "loss.softmax_ce", cost::softmax_crossentropy(n, v, vp, grad), || {
            ops::softmax_crossentropy(&self.dev, self.acts.logits.view(0, n * vp), losses, tv, wv, 1.0 / denom, n, v, vp, grad)?;
            ops::loss_sum(&self.dev, self.loss_acc.view(slot, 1), losses, tv, wv, denom, n)
        });
        self.dlogits_bf16 = matches!(grad, ops::Grad::Bf16(_));
        self.profile = prof;
        r?;
        self.dlogits_ready = with_grad;
        Ok(())
    }

    /// Backward of the last forward + `loss(.., true)`; adds into `grads`.
    ///
    /// # Errors
    /// No loss gradient to propagate, or a launch fails.
    pub fn backward(&mut self) -> Result<()> {
        if !self.dlogits_ready {
            return Err(EngineError::NoForward.into());
        }
        self.dlogits_ready = false;
        self.backward_from(false)
    }

    /// The final hidden states of the last forward `(B, T, C)` (after the last LayerNorm),
    /// copied to the host (the CPU's [`crate::model::gpt::Gpt::hidden`]).
    ///
    /// # Errors
    /// No forward ran, or a failed copy.
    pub fn hidden_to_host(&self) -> Result<Vec<f32>> {
        let (b, t) = self.shape.ok_or(EngineError::NoForward)?;
        let mut out = vec![0.0; b * t * self.config.n_embd];
        self.dev.download(&self.acts.lnf, 0, &mut out)?;
        Ok(out)
    }

    /// Backward from `dhidden` `(B, T, C)`, the gradient of the final hidden states (the CPU's
    /// [`crate::model::gpt::Gpt::backward_from_hidden`]); adds into `grads`.
    ///
    /// # Errors
    /// No forward ran, `dhidden` has the wrong length, or a launch fails.
    pub fn backward_from_hidden(&mut self, dhidden: &[f32]) -> Result<()> {
        let (b, t) = self.shape.ok_or(EngineError::NoForward)?;
        let n = b * t * self.config.n_embd;
        if dhidden.len() != n {
            return Err(EngineError::BadLength { what: "dhidden", expected: n, got: dhidden.len() }.into());
        }
        self.dlogits_ready = false;
        self.dev.upload(&self.gacts.dln, 0, dhidden)?;
        self.backward_from(true)
    }

    /// Backward from the logits' gradient: `write` gets the last forward's logits `(B, T, Vp)`
    /// on the host and overwrites them with `dloss/dlogits` (the CPU's
    /// [`crate::model::gpt::Gpt::backward_from_logits`]); adds into `grads`.
    ///
    /// # Errors
    /// No forward ran, its logits were already consumed, or a copy or launch fails.
    pub fn backward_from_logits(&mut self, write: &mut dyn FnMut(&mut [f32])) -> Result<()> {
        if self.dlogits_ready {
            return Err(EngineError::NoForward.into());
        }
        let mut logits = self.logits_to_host()?;
        write(&mut logits);
        self.dev.upload(&self.acts.logits, 0, &logits)?;
        self.dlogits_bf16 = false;
        self.backward_from(false)
    }

    /// The backward pass, from the logits' gradient (in `logits`) or, with `from_hidden`, from
    /// the final hidden states' gradient (in `dln`).
    fn backward_from(&mut self, from_hidden: bool) -> Result<()> {
        let (b, t) = self.shape.ok_or(EngineError::NoForward)?;
        let mut prof = self.profile.take();
        let r = self.backward_ops(&mut prof, b, t, from_hidden);
        self.profile = prof;
        r
    }

    fn backward_ops(&self, prof: &mut Option<OpProfile>, b: usize, t: usize, from_hidden: bool) -> Result<()> {
        let (dev, a, g, prec, sc) = (&*self.dev, &self.acts, &self.gacts, self.precision, self.scratch());
        let cfg = &self.config;
        let (c, nh, vp) = (cfg.n_embd, cfg.n_head, cfg.padded_vocab_size);
        let n = b * t;
        let cap = self.max_b * self.max_t;
        let (pc, p1, p3, p4, pl) = (cap * c, cap, cap * 3 * c, cap * 4 * c, self.max_b * nh * self.max_t);
        let lv = |buf: &DevBuf<f32>, l: usize, per: usize, len: usize| buf.view(l * per, len);
        let partial = self.partial.all();

        let dres = g.dresidual.view(0, n * c);
        let dres_b = self.bf16_copy(&g.dresidual_bf16, 0, n * c);
        let dln = g.dln.view(0, n * c);
        dev.zero(&g.dresidual, 0, n * c)?;
        if !from_hidden {
            let dlogits = if self.dlogits_bf16 { Act::Bf16(self.scratch_a.view(0, n * vp)) } else { Act::F32(a.logits.view(0, n * vp)) };
            timed(prof, dev, "bwd.lm_head", cost::lm_head_backward(prec, n, c, vp), || {
                ops::lm_head_backward(
                    dev,
                    prec,
                    dln,
                    self.g(K::Wte, 0),
                    dlogits,
                    self.act(a.lnf.view(0, n * c), self.bf16_copy(&a.lnf_bf16, 0, n * c)),
                    self.p(K::Wte, 0),
                    self.pb(K::Wte, 0),
                    sc,
                    n,
                    c,
                    vp,
                )
            })?;
        }
        let last = lv(&a.residual3, cfg.n_layer - 1, pc, n * c);
        timed(prof, dev, "bwd.layernorm", cost::layernorm_backward(n, c), || {
            ops::layernorm_backward(
                dev,
                dres,
                dres_b,
                self.g(K::LnfW, 0),
                self.g(K::LnfB, 0),
                dln,
                last,
                self.p(K::LnfW, 0),
                a.lnf_mean.view(0, n),
                a.lnf_rstd.view(0, n),
                partial,
                n,
                c,
            )
        })?;
        for l in (0..cfg.n_layer).rev() {
            let res_in = if l == 0 { a.encoded.view(0, n * c) } else { lv(&a.residual3, l - 1, pc, n * c) };
            let (dfch, dfch_gelu) = (g.dfch.view(0, n * 4 * c), g.dfch_gelu.view(0, n * 4 * c));
            timed(prof, dev, "bwd.matmul_gelu", cost::matmul_backward_gelu(prec, n, 4 * c, c), || {
                ops::matmul_backward_gelu(
                    dev,
                    prec,
                    dfch,
                    dfch_gelu,
                    self.g(K::FcProjW, l),
                    Some(self.g(K::FcProjB, l)),
                    dres,
                    dres_b,
                    self.operand_view(&a.fch_gelu, &a.fch_gelu_bf16, l * p4, n * 4 * c),
                    lv(&a.fch, l, p4, n * 4 * c),
                    self.p(K::FcProjW, l),
                    self.pb(K::FcProjW, l),
                    sc,
                    partial,
                    n,
                    4 * c,
                    c,
                )
            })?;
            timed(prof, dev, "bwd.matmul", cost::matmul_backward(prec, n, c, 4 * c, true), || {
                ops::matmul_backward(
                    dev,
                    prec,
                    dln,
                    self.g(K::FcW, l),
                    Some(self.g(K::FcB, l)),
                    dfch,
                    None,
                    self.operand_view(&a.ln2, &a.ln2_bf16, l * pc, n * c),
                    self.p(K::FcW, l),
                    self.pb(K::FcW, l),
                    sc,
                    partial,
                    n,
                    c,
                    4 * c,
                )
            })?;
            timed(prof, dev, "bwd.layernorm", cost::layernorm_backward(n, c), || {
                ops::layernorm_backward(
                    dev,
                    dres,
                    dres_b,
                    self.g(K::Ln2W, l),
                    self.g(K::Ln2B, l),
                    dln,
                    lv(&a.residual2, l, pc, n * c),
                    self.p(K::Ln2W, l),
                    lv(&a.ln2_mean, l, p1, n),
                    lv(&a.ln2_rstd, l, p1, n),
                    partial,
                    n,
                    c,
                )
            })?;
            let datty = g.datty.view(0, n * c);
            timed(prof, dev, "bwd.matmul", cost::matmul_backward(prec, n, c, c, true), || {
                ops::matmul_backward(
                    dev,
                    prec,
                    datty,
                    self.g(K::AttProjW, l),
                    Some(self.g(K::AttProjB, l)),
                    dres,
                    dres_b,
                    self.act(lv(&a.atty, l, pc, n * c), self.bf16_copy(&a.atty_bf16, l * pc, n * c)),
                    self.p(K::AttProjW, l),
                    self.pb(K::AttProjW, l),
                    sc,
                    partial,
                    n,
                    c,
                    c,
                )
            })?;
            let (dqkv, dqkv_b) = (g.dqkv.view(0, n * 3 * c), self.bf16_copy(&g.dqkv_bf16, 0, n * 3 * c));
            timed(prof, dev, "bwd.attention", cost::attention_backward(b, t, c, nh, cost::written(Some(dqkv), dqkv_b)), || {
                flash::attention_backward(
                    dev,
                    self.attention,
                    dqkv,
                    dqkv_b,
                    g.delta.view(0, b * nh * t),
                    datty,
                    lv(&a.qkv, l, p3, n * 3 * c),
                    lv(&a.atty, l, pc, n * c),
                    lv(&a.lse, l, pl, b * nh * t),
                    b,
                    t,
                    c,
                    nh,
                )
            })?;
            timed(prof, dev, "bwd.matmul", cost::matmul_backward(prec, n, c, 3 * c, true), || {
                ops::matmul_backward(
                    dev,
                    prec,
                    dln,
                    self.g(K::QkvW, l),
                    Some(self.g(K::QkvB, l)),
                    dqkv,
                    dqkv_b,
                    self.operand_view(&a.ln1, &a.ln1_bf16, l * pc, n * c),
                    self.p(K::QkvW, l),
                    self.pb(K::QkvW, l),
                    sc,
                    partial,
                    n,
                    c,
                    3 * c,
                )
            })?;
            timed(prof, dev, "bwd.layernorm", cost::layernorm_backward(n, c), || {
                ops::layernorm_backward(
                    dev,
                    dres,
                    dres_b,
                    self.g(K::Ln1W, l),
                    self.g(K::Ln1B, l),
                    dln,
                    res_in,
                    self.p(K::Ln1W, l),
                    lv(&a.ln1_mean, l, p1, n),
                    lv(&a.ln1_rstd, l, p1, n),
                    partial,
                    n,
                    c,
                )
            })?;
            // Layer l's gradients are final for this backward: its bucket may be summed now.
            self.mark_bucket(l)?;
        }
        timed(prof, dev, "bwd.encoder", cost::encoder_backward(b, t, c), || {
            ops::encoder_backward(dev, self.g(K::Wte, 0), self.g(K::Wpe, 0), dres, self.inputs.view(0, n), b, t, c)
        })?;
        self.mark_bucket(cfg.n_layer)
    }

    /// Ready mark of gradient bucket `slot` ([`ParamLayout::bucket`]): the side stream's
    /// all-reduce of it waits for the work queued so far, and no later work of the step writes
    /// it (the emulated device checks).
    fn mark_bucket(&self, slot: usize) -> Result<()> {
        self.dev.mark(slot, &self.bucket_views[slot], std::mem::size_of::<f32>())
    }
}
