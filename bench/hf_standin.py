"""A stand-in Hugging Face checkpoint to try the README's commands offline.

  python bench/hf_standin.py --out /tmp/SmolLM2-135M-standin

Writes what `huggingface-cli download HuggingFaceTB/SmolLM2-135M` would put
on disk, in shape only: `config.json` of a Llama with SmolLM2-135M's shape
(tied embeddings, rope_theta 1e5), random bf16 `model.safetensors`, and a
byte-level BPE `tokenizer.json` (trained here on the built-in task suite;
`<|endoftext|>` bos/eos, `<|im_start|>`/`<|im_end|>` with a ChatML chat
template, as SmolLM2-Instruct has) plus small SFT and preference JSONL files
made from the built-in tasks. Nothing is downloaded, and the weights are
random, so losses start near log(vocab): it shows the commands work and what
they print, not what SmolLM2 learns.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load_memory import write_checkpoint  # noqa: E402

CHATML = (
  "{% for message in messages %}"
  "{% if loop.first and messages[0]['role'] != 'system' %}"
  "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
  "{% endif %}"
  "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
  "'<|im_end|>' + '\\n' }}{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tokenizer(out: str, texts) -> None:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  tok.train_from_iterator(
    texts,
    trainers.BpeTrainer(
      vocab_size=2048,
      special_tokens=specials,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
    ),
  )
  tok.save(os.path.join(out, "tokenizer.json"))
  config = {
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "chat_template": CHATML,
    "tokenizer_class": "GPT2Tokenizer",
  }
  with open(os.path.join(out, "tokenizer_config.json"), "w") as fh:
    json.dump(config, fh, indent=1)
  with open(os.path.join(out, "generation_config.json"), "w") as fh:
    json.dump({"bos_token_id": 0, "eos_token_id": [0, 2]}, fh)


def main(argv=None) -> str:
  from jft.data import tasks

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="/tmp/SmolLM2-135M-standin")
  p.add_argument("--data", default="/tmp/jft-standin-data")
  args = p.parse_args(argv)
  suite = tasks.write_suite(args.data, n_train=2000, n_eval=40, seed=0)
  rows = [json.loads(x) for x in open(suite["sft_train"])]
  write_checkpoint(args.out, "smollm2-135m")  # random bf16 weights
  with open(os.path.join(args.out, "config.json")) as fh:
    c = json.load(fh)
  c.update(bos_token_id=0, eos_token_id=0, max_position_embeddings=8192)
  with open(os.path.join(args.out, "config.json"), "w") as fh:
    json.dump(c, fh, indent=2)
  write_tokenizer(args.out, [r["prompt"] + r["completion"] for r in rows])
  rng = np.random.default_rng(0)
  held_out = [json.loads(x) for x in open(suite["sft_eval"])]
  for name, split in (("", rows[:400]), ("_eval", held_out[:40])):
    with open(os.path.join(args.data, f"sft{name}.jsonl"), "w") as fh:
      for r in split:
        msgs = [
          {"role": "user", "content": r["prompt"]},
          {"role": "assistant", "content": r["completion"].strip()},
        ]
        fh.write(json.dumps({"messages": msgs}) + "\n")
    with open(os.path.join(args.data, f"pairs{name}.jsonl"), "w") as fh:
      for r in split:
        answer = r["completion"].strip()
        wrong = tasks.wrong_answer(r["task"], r["prompt"], answer, rng)
        row = {"prompt": r["prompt"], "chosen": r["completion"]}
        fh.write(json.dumps({**row, "rejected": " " + wrong}) + "\n")
  print(f"wrote {args.out} and {args.data}/{{sft,pairs}}{{,_eval}}.jsonl")
  return args.out


if __name__ == "__main__":
  main()
