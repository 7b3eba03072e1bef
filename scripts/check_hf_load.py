#!/usr/bin/env python3
"""Checks that a liandan checkpoint loads in Hugging Face transformers as GPT2LMHeadModel and
decodes like liandan: greedy continuations of a prompt from both must be identical.

    python3 scripts/check_hf_load.py runs/demo [--liandan target/release/liandan] [--prompt 子曰：]

Needs torch and transformers (not needed by CI). Byte-level checkpoints only (token = UTF-8 byte).
"""
import argparse
import os
import subprocess
import sys

import torch
from transformers import GPT2LMHeadModel


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="checkpoint directory or run directory (with 'latest')")
    ap.add_argument("--liandan", default="target/release/liandan")
    ap.add_argument("--prompt", default="子曰：")
    ap.add_argument("--tokens", type=int, default=48)
    a = ap.parse_args()
    ckpt = a.run
    if not os.path.exists(os.path.join(ckpt, "state.json")):
        ckpt = os.path.join(ckpt, open(os.path.join(ckpt, "latest")).read().strip())
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
