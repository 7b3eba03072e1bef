#!/usr/bin/env python3
"""Checks that a liandan checkpoint's tokenizer loads in transformers with its chat template and
formats conversations with the same token ids liandan uses.

    LIANDAN_EXPORT_DIR=/tmp/export cargo test --release -p liandan-worker --lib hf_tokenizer
    python3 scripts/check_hf_tokenizer.py /tmp/export

The test leaves a checkpoint (GPT-2, liandan's tokenizer) and liandan_ids.json (the ids of a few
conversations, with and without the generation prompt) in the directory. Needs transformers (not
torch); with torch installed the model is loaded too (AutoModelForCausalLM).
"""
import json
import sys

from transformers import AutoTokenizer, GenerationConfig


def ids_of(x):
    # transformers 5 returns a BatchEncoding, 4 a list.
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def main() -> int:
    d = sys.argv[1]
    want = json.load(open(f"{d}/liandan_ids.json"))
    tok = AutoTokenizer.from_pretrained(d)
    gen = GenerationConfig.from_pretrained(d)
    print(f"tokenizer: {type(tok).__name__}, vocab {len(tok)}, bos {tok.bos_token!r} eos {tok.eos_token!r} pad {tok.pad_token!r}")
    print(f"generation_config eos_token_id {gen.eos_token_id}, liandan stop tokens {want['stop_tokens']}")
    bad = 0
    if sorted(gen.eos_token_id) != sorted(want["stop_tokens"]):
        print("MISMATCH stop tokens", file=sys.stderr)
        bad += 1
    for i, case in enumerate(want["cases"]):
        msgs = case["messages"]
        full = ids_of(tok.apply_chat_template(msgs, tokenize=True))
        prompt = ids_of(tok.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True))
        ok = full == case["ids"] and prompt == case["prompt_ids"]
        print(f"conversation {i}: {len(full)} ids, prompt {len(prompt)} ids: {'same' if ok else 'DIFFERENT'}")
        print("   ", tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True))
        if not ok:
            print(f"    transformers {full}\n    liandan      {case['ids']}\n    prompt hf {prompt}\n    prompt ld {case['prompt_ids']}", file=sys.stderr)
            bad += 1
    try:
        import torch  # noqa: F401
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(d)
        print(f"model: {type(m).__name__} loads")
    except ImportError:
        print("model: torch not installed, AutoModelForCausalLM not tried")
    if bad:
        return 1
    print(f"ok: {d} loads with AutoTokenizer and apply_chat_template gives liandan's ids")
    return 0


if __name__ == "__main__":
    sys.exit(main())
