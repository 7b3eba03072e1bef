#!/usr/bin/env python3
"""Write the PyTorch reference fixture for liandan's GPT-2 implementation.

Output: tests/fixtures/gpt2_tiny.safetensors (relative to the repository root).

The file is an independent reference produced with Hugging Face transformers'
``GPT2LMHeadModel`` (eager attention, gelu_new, float32) for a tiny config
(vocab 100, context 32, 2 layers, 4 heads, 32 channels). It holds:

* every model parameter under its Hugging Face name and shape, e.g.
  ``transformer.wte.weight`` (100, 32), ``transformer.h.0.attn.c_attn.weight``
  (32, 96) -- Conv1D weights are stored (in, out). ``lm_head.weight`` is not
  written: it is tied to ``transformer.wte.weight``. Biases and LayerNorm
  parameters carry small random noise on top of the usual init so they are
  non-trivial;
* one batch: ``inputs`` int32 (4, 16), ``targets`` int32 (4, 16) with -1 as
  the ignore index, ``weights`` float32 (4, 16) per-token loss weights (some 0);
* ``logits`` (4, 16, 100) and ``loss`` (1,) from the initial weights, where
  ``loss = sum(ce * w) / sum(w over non-ignored targets)`` and ``ce`` is the
  per-token cross entropy (0 at ignored positions);
* ``grads.<name>`` for every parameter written: d loss / d param at the
  initial weights (the wte gradient includes the tied LM-head contribution);
* ``losses`` (10,), ``lrs`` (10,), ``grad_norms`` (10,): a 10-step AdamW run
  on the same batch (loss recorded before each update, pre-clip global grad
  norm, clip to 1.0, warmup + cosine LR schedule, weight decay 0.1 on tensors
  with dim >= 2 only).

The safetensors metadata records the format name and version, the config and
hyper-parameters as JSON, and the torch / transformers versions used. Its
metadata keys are written in sorted order, so with the same torch and
transformers versions a rerun reproduces the file byte for byte.

Run from the repository root:

    python3 scripts/torch_fixture.py

Requires torch, numpy, safetensors and transformers. CI does not run this
script: its output is committed, and the Rust tests read the committed file.
"""

import json
import math
import os
import struct
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import transformers
from transformers import GPT2Config, GPT2LMHeadModel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_PATH = os.path.join(REPO_ROOT, "tests", "fixtures", "gpt2_tiny.safetensors")

CONFIG = {
    "vocab_size": 100,
    "n_positions": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_embd": 32,
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

SEED = 1337
IGNORE = CONFIG["ignore_index"]


def build_model():
    hf_cfg = GPT2Config(
        vocab_size=CONFIG["vocab_size"],
        n_positions=CONFIG["n_positions"],
        n_embd=CONFIG["n_embd"],
        n_layer=CONFIG["n_layer"],
        n_head=CONFIG["n_head"],
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        # The defaults (50256) lie outside this tiny vocabulary; they play no
        # part in the forward pass.
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    model = GPT2LMHeadModel(hf_cfg).to(torch.float32)
    assert model.lm_head.weight is model.transformer.wte.weight, "LM head must be tied"
    # Make biases and LayerNorm parameters non-trivial (HF initialises them
    # to 0 / 1).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.02)
    model.train()  # all dropout probabilities are 0, so train == eval here
    return model


def make_batch():
    B, T, V = CONFIG["B"], CONFIG["T"], CONFIG["vocab_size"]
    inputs = torch.randint(0, V, (B, T), dtype=torch.int64)
    targets = torch.randint(0, V, (B, T), dtype=torch.int64)
    ignore = torch.rand(B, T) < 0.2
    for b in range(B):
        # keep at least a quarter of every row
        if (~ignore[b]).sum() < T // 4:
            ignore[b, : T // 2] = False
    targets[ignore] = IGNORE
    weights = torch.rand(B, T) + 0.5  # uniform in [0.5, 1.5)
    # two exact zeros at positions whose targets are kept, so that they matter
    kept = (~ignore).nonzero().tolist()
    for b, t in (kept[3], kept[-5]):
        weights[b, t] = 0.0
    for b in range(B):
        assert (targets[b] != IGNORE).any()
    assert (weights[targets != IGNORE] > 0).any()
    return inputs, targets, weights


def loss_fn(logits, targets, weights):
    V = logits.size(-1)
    ce = F.cross_entropy(
        logits.view(-1, V),
        targets.view(-1).long(),
        ignore_index=IGNORE,
        reduction="none",
    )
    mask = targets != IGNORE
    w = weights.view(-1)
    return (ce * w).sum() / w[mask.view(-1)].sum()


def lr_at(step):
    max_lr, min_lr = CONFIG["max_lr"], CONFIG["min_lr"]
    W, S = CONFIG["warmup_steps"], CONFIG["total_steps"]
    if step < W:
        return max_lr * (step + 1) / W
    if step >= S:
        return min_lr
    r = (step - W) / (S - W)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * r)) * (max_lr - min_lr)


def written_params(model):
    """(HF name, parameter) pairs written to the fixture, in state_dict order."""
    params = dict(model.named_parameters())
    out = []
    for name in model.state_dict().keys():
        if not name.startswith("transformer."):
            continue  # lm_head.weight is tied to transformer.wte.weight
        if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
            continue  # causal-mask buffers in older transformers releases
        if name not in params:
            continue  # any other buffer
        out.append((name, params[name]))
    assert len(out) == len(params), (sorted(params), [n for n, _ in out])
    return out


def train(model, inputs, targets, weights, steps):
    named = list(model.named_parameters())
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": CONFIG["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=CONFIG["max_lr"],
        betas=(CONFIG["beta1"], CONFIG["beta2"]),
        eps=CONFIG["eps"],
        foreach=False,
        fused=False,
    )
    params = [p for _, p in named]
    losses, lrs, norms = [], [], []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs).logits
        loss = loss_fn(logits, targets, weights)
        losses.append(loss.item())
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, CONFIG["grad_clip"])
        norms.append(norm.item())
        lr = lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        lrs.append(lr)
        opt.step()
    return losses, lrs, norms


def canonicalise_header(path):
    """Rewrite the safetensors header with its metadata keys sorted.

    The safetensors writer keeps metadata in a hash map, so the key order (and
    hence the file's bytes) changes from run to run. Sorting makes reruns
    byte-identical. Tensor entries and data offsets are left untouched.
    """
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    out = {"__metadata__": dict(sorted(meta.items()))}
    out.update(header)
    text = json.dumps(out, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + blob[8 + n :])


def main():
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    model = build_model()
    inputs, targets, weights = make_batch()

    tensors = {}
    params = written_params(model)
    for name, p in params:
        tensors[name] = p.detach().clone().contiguous()

    tensors["inputs"] = inputs.to(torch.int32).contiguous()
    tensors["targets"] = targets.to(torch.int32).contiguous()
    tensors["weights"] = weights.contiguous()

    # forward + backward at the initial weights
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=inputs).logits
    loss = loss_fn(logits, targets, weights)
    loss.backward()
    tensors["logits"] = logits.detach().clone().contiguous()
    tensors["loss"] = loss.detach().reshape(1).clone()
    for name, p in params:
        assert p.grad is not None, name
        tensors["grads." + name] = p.grad.detach().clone().contiguous()
    model.zero_grad(set_to_none=True)

    # 10-step training run from the same initial weights (training mutates
    # the model, so this comes after everything above has been copied)
    losses, lrs, norms = train(model, inputs, targets, weights, CONFIG["total_steps"])
    assert abs(losses[0] - loss.item()) <= 1e-6 * abs(loss.item())
    tensors["losses"] = torch.tensor(losses, dtype=torch.float32)
    tensors["lrs"] = torch.tensor(lrs, dtype=torch.float32)
    tensors["grad_norms"] = torch.tensor(norms, dtype=torch.float32)

    for k, v in tensors.items():
        assert v.is_contiguous(), k
        assert v.dtype in (torch.float32, torch.int32), (k, v.dtype)

    metadata = {
        "format": "liandan-torch-fixture",
        "version": "1",
        "config": json.dumps(CONFIG),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    os.makedirs(os.path.dirname(OUT_PATH), exist_ok=True)
    save_file(tensors, OUT_PATH, metadata=metadata)
    canonicalise_header(OUT_PATH)
    with safe_open(OUT_PATH, framework="pt") as f:
        assert f.metadata() == metadata
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), tensors[k]), k
    size = os.path.getsize(OUT_PATH)
    assert size < 1_000_000, size

    print(f"wrote {os.path.relpath(OUT_PATH, REPO_ROOT)} ({size} bytes, {len(tensors)} tensors)")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"parameters: {len(params)}, {sum(p.numel() for _, p in params)} values")
    print(f"ignored targets: {(targets == IGNORE).sum().item()} of {targets.numel()}, "
          f"zero weights: {(weights == 0).sum().item()}")
    print(f"loss: {loss.item():.7f}")
    print("losses: [" + ", ".join(f"{x:.6f}" for x in losses) + "]")
    print("lrs: [" + ", ".join(f"{x:.6g}" for x in lrs) + "]")
    print("grad_norms: [" + ", ".join(f"{x:.6f}" for x in norms) + "]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
