#!/usr/bin/env python3
"""Write the transformers reference fixtures for liandan's llama family.

Output (relative to the repository root):

* tests/fixtures/llama_tiny/    a LlamaForCausalLM directory from ``save_pretrained``:
  grouped-query attention (4 query heads, 2 key/value heads), untied LM head, no biases;
* tests/fixtures/qwen2_tiny/    a Qwen2ForCausalLM directory: q/k/v biases, tied LM head,
  rope_theta 1e6, 4 query heads over 2 key/value heads;
* tests/fixtures/llama_tiny.ref.safetensors, tests/fixtures/qwen2_tiny.ref.safetensors:
  one batch (``inputs``, ``targets`` with -1 ignored, per-position ``weights``), the
  ``logits`` and ``loss`` at the saved weights, ``grads.<hf name>`` for every parameter, and a
  10-step AdamW run (``losses``, ``lrs``, ``grad_norms``) with liandan's schedule, clipping
  and weight-decay mask, exactly as scripts/torch_fixture.py does for GPT-2.

Every model is tiny (vocab 128, hidden 32, 2 layers) and float32 with eager attention. Norm
weights and biases carry random noise so that they matter. The Rust tests
(tests/tests/hf_parity.rs) read the directories through liandan's import path.

Run from the repository root (CI does not; the outputs are committed):

    python3 scripts/hf_fixture.py

Requires torch, transformers, safetensors and numpy.
"""

import json
import math
import os
import shutil
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures")

TRAIN = {
    "B": 4,
    "T": 16,
    "max_lr": 0.01,
    "min_lr": 0.001,
    "warmup_steps": 3,
    "total_steps": 10,
    "weight_decay": 0.1,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-8,
    "grad_clip": 1.0,
    "ignore_index": -1,
}
IGNORE = TRAIN["ignore_index"]

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    attention_dropout=0.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    attn_implementation="eager",
)


def build(name):
    if name == "llama_tiny":
        cfg = LlamaConfig(**COMMON, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Qwen2Config(**COMMON, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False)
        model = Qwen2ForCausalLM(cfg)
    model = model.to(torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                # A wider init than 0.02 so the tiny model's logits are not all near zero.
                p.mul_(4.0)
    model.train()
    return model


def make_batch():
    B, T, V = TRAIN["B"], TRAIN["T"], COMMON["vocab_size"]
    inputs = torch.randint(0, V, (B, T), dtype=torch.int64)
    targets = torch.randint(0, V, (B, T), dtype=torch.int64)
    ignore = torch.rand(B, T) < 0.2
    for b in range(B):
        if (~ignore[b]).sum() < T // 4:
            ignore[b, : T // 2] = False
    targets[ignore] = IGNORE
    weights = torch.rand(B, T) + 0.5
    kept = (~ignore).nonzero().tolist()
    for b, t in (kept[3], kept[-5]):
        weights[b, t] = 0.0
    return inputs, targets, weights


def loss_fn(logits, targets, weights):
    V = logits.size(-1)
    ce = F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=IGNORE, reduction="none")
    mask = targets != IGNORE
    w = weights.view(-1)
    return (ce * w).sum() / w[mask.view(-1)].sum()


def lr_at(step):
    max_lr, min_lr = TRAIN["max_lr"], TRAIN["min_lr"]
    W, S = TRAIN["warmup_steps"], TRAIN["total_steps"]
    if step < W:
        return max_lr * (step + 1) / W
    if step >= S:
        return min_lr
    r = (step - W) / (S - W)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * r)) * (max_lr - min_lr)


def train(model, inputs, targets, weights):
    named = list(model.named_parameters())
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": TRAIN["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=TRAIN["max_lr"], betas=(TRAIN["beta1"], TRAIN["beta2"]), eps=TRAIN["eps"], foreach=False, fused=False,
    )
    params = [p for _, p in named]
    losses, lrs, norms = [], [], []
    for step in range(TRAIN["total_steps"]):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(input_ids=inputs).logits, targets, weights)
        losses.append(loss.item())
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(params, TRAIN["grad_clip"]).item())
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        lrs.append(lr)
        opt.step()
    return losses, lrs, norms


def one(name, seed):
    torch.manual_seed(seed)
    model = build(name)
    out_dir = os.path.join(FIXTURES, name)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    inputs, targets, weights = make_batch()
    tensors = {"inputs": inputs.to(torch.int32), "targets": targets.to(torch.int32), "weights": weights.contiguous()}
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=inputs).logits
    loss = loss_fn(logits, targets, weights)
    loss.backward()
    tensors["logits"] = logits.detach().clone().contiguous()
    tensors["loss"] = loss.detach().reshape(1).clone()
    for n, p in model.named_parameters():
        tensors["grads." + n] = p.grad.detach().clone().contiguous()
    model.zero_grad(set_to_none=True)
    losses, lrs, norms = train(model, inputs, targets, weights)
    tensors["losses"] = torch.tensor(losses, dtype=torch.float32)
    tensors["lrs"] = torch.tensor(lrs, dtype=torch.float32)
    tensors["grad_norms"] = torch.tensor(norms, dtype=torch.float32)
    meta = {
        "format": "liandan-hf-fixture",
        "version": "1",
        "train": json.dumps(TRAIN),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    ref = os.path.join(FIXTURES, name + ".ref.safetensors")
    save_file(tensors, ref, metadata=meta)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir)) + os.path.getsize(ref)
    assert size < 600_000, size
    print(f"{name}: {size} bytes; loss {loss.item():.7f}")
    print("  losses: [" + ", ".join(f"{x:.6f}" for x in losses) + "]")
    print("  grad_norms: [" + ", ".join(f"{x:.6f}" for x in norms) + "]")


def main():
    torch.use_deterministic_algorithms(True)
    one("llama_tiny", 1234)
    one("qwen2_tiny", 4321)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
