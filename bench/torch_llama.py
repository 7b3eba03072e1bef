#!/usr/bin/env python3
"""PyTorch side of the CPU training benchmark for the llama family.

Times full training steps (zero_grad, forward, loss, backward, clip_grad_norm_
1.0, AdamW step) of transformers' own Qwen2ForCausalLM, float32, eager, on the
CPU, at the shape of `liandan bench train --model qwen2.5-0.5b`: Qwen2.5-0.5B's
config (24 layers, hidden 896, 14 query heads over 2 key/value heads,
intermediate 4864, q/k/v biases, tied embeddings, rope theta 1e6, vocabulary
151936), with random weights (nothing is downloaded). Attention is
transformers' "sdpa" implementation (F.scaled_dot_product_attention).

Usage (from the repository root; needs torch and transformers):

    python3 bench/torch_llama.py --batch 1 --seq 256 --threads 2 --steps 5

The last line printed is machine-readable, as bench/torch_gpt.py's:

    bench_result impl=pytorch model=qwen2.5-0.5b batch=1 seq=256 threads=2 tokens_per_s=... step_ms=...
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from torch_gpt import make_optimizer  # the same AdamW groups as the GPT-2 peer

PRESETS = {
    "qwen2.5-0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(PRESETS), default="qwen2.5-0.5b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    if min(args.batch, args.seq, args.threads, args.steps) < 1 or args.warmup < 0:
        ap.error("--batch, --seq, --threads and --steps must be >= 1, --warmup >= 0")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = Qwen2Config(**PRESETS[args.model], attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).float()
    model.train()
    opt = make_optimizer(model, lr=3e-4, weight_decay=0.1)
    B, T, V = args.batch, args.seq, config.vocab_size
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"pytorch {torch.__version__} eager f32 cpu, transformers Qwen2ForCausalLM, threads={torch.get_num_threads()}, "
        f"model={args.model} (L={config.num_hidden_layers} C={config.hidden_size} NH={config.num_attention_heads} "
        f"NKV={config.num_key_value_heads} I={config.intermediate_size} V={V}), batch={B} seq={T}, params={n_params / 1e6:.1f}M"
    )
    gen = torch.Generator().manual_seed(args.seed)

    def step():
        tok = torch.randint(0, V, (B, T + 1), generator=gen)
        x, y = tok[:, :-1].contiguous(), tok[:, 1:].contiguous()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.view(-1, V), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item(), time.perf_counter() - t0

    for i in range(args.warmup):
        loss, dt = step()
        print(f"warmup {i}: loss {loss:.4f}  {1e3 * dt:.1f} ms")
    times = []
    for i in range(args.steps):
        loss, dt = step()
        times.append(dt)
        print(f"step {i}: loss {loss:.4f}  {1e3 * dt:.1f} ms  {B * T / dt:.1f} tok/s")
    mean = sum(times) / len(times)
    std = math.sqrt(sum((t - mean) ** 2 for t in times) / len(times))
    print(f"mean step {1e3 * mean:.1f} ms (std {1e3 * std:.1f}, min {1e3 * min(times):.1f})")
    print(
        f"bench_result impl=pytorch model={args.model} batch={B} seq={T} threads={args.threads} "
        f"tokens_per_s={B * T / mean:.1f} step_ms={1e3 * mean:.1f}"
    )


if __name__ == "__main__":
    main()
