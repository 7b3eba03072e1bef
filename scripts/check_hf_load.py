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

Chat models of either family (a tokenizer.json and a chat template in tokenizer_config.json):
with --chat, AutoTokenizer renders the prompt with `apply_chat_template(...,
add_generation_prompt=True)`, AutoModelForCausalLM answers greedily until an end-of-turn token
of generation_config.json, and the answer must equal the one `liandan chat --temperature 0`
gives for the same prompt:

    python3 scripts/check_hf_load.py DIR --chat [--prompt 床前明月光] [--tokens 16]

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


def check_chat(ckpt: str, liandan: str, prompt: str, tokens: int) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager", dtype=torch.float32).eval()
    gen = GenerationConfig.from_pretrained(ckpt)
    print(f"loaded {ckpt} as {type(model).__name__} with {type(tok).__name__}; eos {gen.eos_token_id}")
    rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    print(f"template: {rendered!r}")
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False,
                             eos_token_id=gen.eos_token_id, pad_token_id=tok.pad_token_id)
    new = out[0, len(ids):].tolist()
    hf_text = tok.decode(new, skip_special_tokens=True).strip()
    chat = subprocess.run([liandan, "chat", "--checkpoint", ckpt, "--temperature", "0",
                           "--max-new-tokens", str(tokens)], input=prompt + "\n\n",
                          capture_output=True, text=True, check=True).stdout
    ours = next((l.split("模型>", 1)[1].strip() for l in chat.splitlines() if "模型>" in l), None)
    print(f"transformers: {hf_text!r} ({len(new)} tokens)")
    print(f"liandan:      {ours!r}")
    if ours != hf_text:
        print("MISMATCH", file=sys.stderr)
        return 1
    print(f"ok: {ckpt} loads in transformers, renders its chat template, and answers as liandan does")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="checkpoint directory or run directory (with 'latest')")
    ap.add_argument("--liandan", default="target/release/liandan")
    ap.add_argument("--prompt", default="子曰：")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--logits", help="reference logits (safetensors with inputs, logits) for a llama-family checkpoint")
    ap.add_argument("--chat", action="store_true", help="compare a greedy chat answer with `liandan chat`")
    a = ap.parse_args()
    ckpt = a.run
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        ckpt = os.path.join(ckpt, open(os.path.join(ckpt, "latest")).read().strip())
    if a.logits:
        return check_logits(ckpt, a.logits)
    if a.chat:
        return check_chat(ckpt, a.liandan, a.prompt, a.tokens)
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
