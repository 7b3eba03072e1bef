#!/usr/bin/env python3
"""Writes tests/fixtures/hf_tokenizer_tiny/: a tiny Hugging Face tokenizer directory shaped like
Qwen2-Instruct's (byte-level BPE, <|endoftext|> <|im_start|> <|im_end|> added after the merges,
the ChatML chat_template, eos = <|im_end|>, pad = <|endoftext|>, no bos), and expected.json:
the ids `transformers`' `apply_chat_template` gives for a few conversations, with and without
the generation prompt. liandan's tests load the directory and must give the same ids.

    pip install transformers tokenizers jinja2
    python3 scripts/build_hf_tokenizer_fixture.py

Deterministic: the BPE is trained on data/demo/lunyu.txt with fixed settings.
"""
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "hf_tokenizer_tiny")

# Qwen2-Instruct's chat template, as its tokenizer_config.json has it.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "学而时习之"}, {"role": "assistant", "content": "不亦说乎？"}],
    [{"role": "system", "content": "你是孔子。"}, {"role": "user", "content": "何为仁？"}, {"role": "assistant", "content": "爱人。"}],
    [
        {"role": "user", "content": "子曰：温故而知新"},
        {"role": "assistant", "content": "可以为师矣。"},
        {"role": "user", "content": "user assistant\nsystem"},
        {"role": "assistant", "content": " Hello, world! 123 "},
    ],
]


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    text = open(os.path.join(ROOT, "data", "demo", "lunyu.txt"), encoding="utf-8").read().splitlines()
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(text, trainer)
    tk.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tk.save(os.path.join(OUT, "tokenizer.json"))
    ids = {t: tk.token_to_id(t) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}
    config = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHATML,
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
    }
    json.dump(config, open(os.path.join(OUT, "tokenizer_config.json"), "w"), ensure_ascii=False, indent=2)
    gen = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]}
    json.dump(gen, open(os.path.join(OUT, "generation_config.json"), "w"), indent=2)

    hf = AutoTokenizer.from_pretrained(OUT)

    def ids_of(x):
        # transformers 5 returns a BatchEncoding, 4 a list.
        return list(x["input_ids"] if hasattr(x, "keys") else x)

    cases = []
    for conv in CONVERSATIONS:
        full = ids_of(hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=False))
        upto = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
        prompt = ids_of(hf.apply_chat_template(conv[:upto], tokenize=True, add_generation_prompt=True))
        cases.append({"messages": conv, "ids": list(full), "prompt_ids": list(prompt),
                      "text": hf.apply_chat_template(conv, tokenize=False)})
    expected = {"vocab_size": len(hf), "special": ids, "cases": cases}
    json.dump(expected, open(os.path.join(OUT, "expected.json"), "w"), ensure_ascii=False, indent=1)
    print(f"wrote {OUT}: vocab {len(hf)}, {len(cases)} conversations")


if __name__ == "__main__":
    main()
