#!/usr/bin/env python3
"""PyTorch side of the CPU training benchmark.

Times full GPT-2 training steps (zero_grad, forward, loss, backward,
clip_grad_norm_ 1.0, AdamW step) in eager PyTorch, float32, on the CPU, so
that `liandan bench train --device cpu` has a like-for-like reference. No
torch.compile. The model is a plain nanoGPT-style GPT-2: pre-LN blocks,
learned position embeddings, tanh GELU, F.scaled_dot_product_attention with
is_causal=True, and an LM head tied to the token embedding.

Usage (from the repository root):

    python3 bench/torch_gpt.py --model tiny --batch 4 --threads 2 --steps 10
    python3 bench/torch_gpt.py --model small-256 --profile

The last line printed is machine-readable, e.g.

    bench_result impl=pytorch model=tiny batch=4 seq=256 threads=2 tokens_per_s=1234.5 step_ms=830.1

where step_ms is the mean wall time of the timed steps (warmup excluded) and
tokens_per_s = batch * seq / (step_ms / 1000). bench/compare.sh runs this
next to liandan and tabulates both.
"""

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 50257
# The embedding / LM head are padded to a multiple of 64 (as nanoGPT does).
PADDED_VOCAB = 50304

PRESETS = {
    # name: (n_layer, n_embd, n_head, seq_len)
    "tiny": (4, 256, 4, 256),
    "small-256": (12, 768, 12, 256),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, n_layer, n_embd, n_head, block_size):
        super().__init__()
        self.wte = nn.Embedding(PADDED_VOCAB, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, PADDED_VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets):
        _, T = idx.shape
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        # As in nanoGPT, the cross entropy runs over the full padded logits
        # (50304 columns). Targets are always < 50257, so the 47 padding
        # columns only add their (tiny) share to the softmax and the head
        # matmul; liandan's numbers are compared against this as is.
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def make_optimizer(model, lr, weight_decay):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    # Default implementation choice (no foreach/fused override).
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def train_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile one more step and print the top 15 ops by self CPU time",
    )
    args = ap.parse_args()
    if args.batch < 1 or args.threads < 1 or args.steps < 1 or args.warmup < 0:
        ap.error("--batch, --threads and --steps must be >= 1, --warmup >= 0")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    n_layer, n_embd, n_head, T = PRESETS[args.model]
    B = args.batch

    model = GPT(n_layer, n_embd, n_head, T)
    model.train()
    opt = make_optimizer(model, lr=3e-4, weight_decay=0.1)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"pytorch {torch.__version__} eager f32 cpu, threads={torch.get_num_threads()}, "
        f"model={args.model} (L={n_layer} C={n_embd} NH={n_head} T={T}), batch={B}, "
        f"params={n_params / 1e6:.2f}M (vocab padded to {PADDED_VOCAB})"
    )

    gen = torch.Generator().manual_seed(args.seed)

    def batch():
        tok = torch.randint(0, VOCAB, (B, T + 1), generator=gen)
        return tok[:, :-1].contiguous(), tok[:, 1:].contiguous()

    for i in range(args.warmup):
        x, y = batch()
        t0 = time.perf_counter()
        loss = train_step(model, opt, x, y)
        print(f"warmup {i}: loss {loss:.4f}  {1e3 * (time.perf_counter() - t0):.1f} ms")

    times = []
    for i in range(args.steps):
        x, y = batch()  # data generation is outside the timed region
        t0 = time.perf_counter()
        loss = train_step(model, opt, x, y)
        dt = time.perf_counter() - t0
        times.append(dt)
        print(f"step {i}: loss {loss:.4f}  {1e3 * dt:.1f} ms  {B * T / dt:.1f} tok/s")

    mean = sum(times) / len(times)
    std = math.sqrt(sum((t - mean) ** 2 for t in times) / len(times))
    tokens_per_s = B * T / mean
    print(
        f"mean step {1e3 * mean:.1f} ms (std {1e3 * std:.1f}, min {1e3 * min(times):.1f}) "
        f"over {len(times)} steps, {tokens_per_s:.1f} tok/s"
    )

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        x, y = batch()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(model, opt, x, y)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

    print(
        f"bench_result impl=pytorch model={args.model} batch={B} seq={T} "
        f"threads={args.threads} tokens_per_s={tokens_per_s:.1f} step_ms={1e3 * mean:.1f}"
    )


if __name__ == "__main__":
    main()
