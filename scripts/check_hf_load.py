#!/usr/bin/env python3
"""Checks that a liandan checkpoint loads in Hugging Face transformers.

GPT-2 checkpoints (byte-level): greedy continuations of a prompt from transformers and from
`liandan generate` must be identical:

    python3 scripts/check_hf_load.py runs/demo [--liandan target/release/liandan] [--prompt 子曰：]

Llama-family checkpoints (LlamaForCausalLM / Qwen2ForCausalLM, any tokenizer): with --logits,
the checkpoint loads with AutoModelForCausalLM, and its logits on a fixed token sequence are
compared with the reference logits liandan wrote (a safetensors file with `inputs` (B, T)
int32 and `logits` (B, T, V) float32, e.g. from `--write-reference`), within 1e-4:

    python3 scripts/check_hf_load.py DIR --logits DIR/reference_logits.safetensors

Needs torch and transformers (not needed by CI).
"""
import argparse
import json
import os
import subprocess
import sys

import torch


def check_logits(ckpt: str, ref: str) -> int:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    arch = json.load(open(os.path.join(ckpt, "config.json")))["architectures"][0]
    model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager", dtype=torch.float32).eval()
    print(f"loaded {ckpt} as {type(model).__name__} (config.json says {arch})")
    t = load_file(ref)
    with torch.no_grad():
        got = model(input_ids=t["inputs"].long()).logits
    want = t["logits"]
    diff = (got - want).abs().max().item()
    print(f"logits {tuple(got.shape)}: max |transformers - liandan| = {diff:.3e}")
    if diff > 1e-4:
        print("MISMATCH", file=sys.stderr)
        return 1
    print(f"ok: {ckpt} loads in transformers and its logits match liandan's")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="checkpoint directory or run directory (with 'latest')")
    ap.add_argument("--liandan", default="target/release/liandan")
    ap.add_argument("--prompt", default="子曰：")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--logits", help="reference logits (safetensors with inputs, logits) for a llama-family checkpoint")
    a = ap.parse_args()
    ckpt = a.run
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        ckpt = os.path.join(ckpt, open(os.path.join(ckpt, "latest")).read().strip())
    if a.logits:
        return check_logits(ckpt, a.logits)
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(ckpt, attn_implementation="eager").eval()
    ids = list(a.prompt.encode("utf-8"))
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=a.tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    hf_text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    ours = subprocess.run([a.liandan, "generate", "--checkpoint", ckpt, "--prompt", a.prompt,
                           "--greedy", "--max-new-tokens", str(a.tokens)],
                          capture_output=True, text=True, check=True).stdout.rstrip("\n")
    print("transformers:", hf_text)
    print("liandan:     ", ours)
    if hf_text != ours:
        print("MISMATCH", file=sys.stderr)
        return 1
    print(f"ok: {ckpt} loads in transformers and greedy decoding of {a.tokens} tokens matches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
