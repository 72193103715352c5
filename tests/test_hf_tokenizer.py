"""Hugging Face tokenizers and chat templates, checked against transformers.

Every tokenizer here is built offline with the `tokenizers` library: a
byte-level BPE in the style of Llama 3 / Qwen and a Metaspace BPE with byte
fallback in the style of Llama 2 / Gemma, written with their
tokenizer_config.json (+ special_tokens_map.json, generation_config.json)
into temporary directories. The chat templates are written here in the
style of those families. transformers (a test-only dependency) is the
reference for encode, decode and template rendering.
"""

import datetime
import json
import os
import pickle

import numpy as np
import pytest
from tokenizers import (
  AddedToken,
  Tokenizer,
  decoders,
  models,
  normalizers,
  pre_tokenizers,
  processors,
  trainers,
)

from jft.config import base_config
from jft.data import chat, tasks
from jft.data import hf_tokenizer as hft
from jft.data.jsonl import DataError, Record
from jft.data.tokenizer import Tokenizer as SPTokenizer
from jft.data.tokenizer import load_tokenizer_dir, load_tokenizer_file
from jft.data.tokenizer_util import split_by_offsets
from jft.objectives import clm, dpo, sft

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

CORPUS = [
  "The quick brown fox jumps over the lazy dog.",
  "add: 12 + 30 = 42",
  "copy: a b c = a b c",
  "Hello world, hello there! helloworld and worldhello",
  "naïve café déjà vu — 中文 文本 🙂",
  "  indented   with  runs\tof\twhitespace\n\nnew lines",
  "answer: 1234567890 user assistant system model",
] * 20

CHAT_FAMILIES = ["llama3", "qwen", "gemma", "llama2"]
BYTE_SPECIALS = [
  "<|begin_of_text|>",
  "<|end_of_text|>",
  "<|eot_id|>",
  "<|start_header_id|>",
  "<|end_header_id|>",
  "<|im_start|>",
  "<|im_end|>",
  "<|endoftext|>",
]
META_SPECIALS = [
  "<unk>",
  "<s>",
  "</s>",
  "<pad>",
  "<bos>",
  "<eos>",
  "<start_of_turn>",
  "<end_of_turn>",
]

# Templates written for these tests in the style of each family.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CHATML_TEMPLATE = """{% for message in messages %}
{% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>{% if not loop.last %}{{ '\\n' }}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
{{ '\\n' if messages else '' }}<|im_start|>assistant
{% endif %}"""

GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Roles must alternate user/assistant/user/...') }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant'
        else message['role'] -%}
    {{ '<start_of_turn>' + role + '\\n'
       + (first_user_prefix if loop.first else '') }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\\n' }}
{%- endif -%}
"""

TOOLS_TEMPLATE = """{%- set ns = namespace(system='', turns=0) %}
{%- for m in messages %}
  {%- if m.role == 'system' %}{% set ns.system = m.content %}{% endif %}
{%- endfor %}
{%- if tools %}
[TOOLS]{{ tools | tojson }}[/TOOLS]
{%- for t in tools %}{{ t | tojson(indent=2) }}{% endfor %}
{%- endif %}
{%- set opts = dict(sep=' | ', last=messages | length) %}
{%- for m in messages if m.role != 'system' %}
  {%- if m.role == 'user' %}
    {%- set ns.turns = ns.turns + 1 %}
{{ bos_token }}[INST] {% if ns.system and loop.first %}{{ ns.system }}
{{ '\\n' }}{% endif %}{{ m.content }} [/INST]
  {%- elif m.role == 'assistant' %}
 {{ m.content }}{{ eos_token }}
    {%- if m.content is string and 'STOP' in m.content %}{% break %}{% endif %}
  {%- else %}
    {{- raise_exception('Unknown role: ' + m.role) }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ opts.sep }}turns={{ ns.turns }}{% endif %}
"""

PREFIX_UNSTABLE_TEMPLATE = """{% for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}{% if loop.last %}{{ eos_token }}{% else %}<|im_end|>{% endif %}
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def _byte_level() -> Tokenizer:
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=BYTE_SPECIALS,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(CORPUS, trainer)
  return tok


def _metaspace() -> Tokenizer:
  """A Llama 2 / Gemma-style BPE: Metaspace (no split), byte fallback."""
  pre = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
  base = Tokenizer(models.BPE(unk_token="<unk>"))
  base.pre_tokenizer = pre
  base.train_from_iterator(
    CORPUS,
    trainers.BpeTrainer(
      vocab_size=300, special_tokens=META_SPECIALS, show_progress=False
    ),
  )
  model = json.loads(base.to_str())["model"]
  vocab = model["vocab"]
  for b in range(256):
    vocab.setdefault(f"<0x{b:02X}>", len(vocab))
  merges = [tuple(m) for m in model["merges"]]
  tok = Tokenizer(
    models.BPE(
      vocab=vocab,
      merges=merges,
      unk_token="<unk>",
      byte_fallback=True,
      fuse_unk=True,
    )
  )
  tok.add_special_tokens(
    [AddedToken(s, special=True, normalized=False) for s in META_SPECIALS]
  )
  tok.pre_tokenizer = pre
  tok.decoder = decoders.Sequence(
    [
      decoders.Replace("▁", " "),
      decoders.ByteFallback(),
      decoders.Fuse(),
      decoders.Strip(" ", 1, 0),
    ]
  )
  return tok


def _wordpiece() -> Tokenizer:
  """A BERT-style WordPiece: decoding relies on transformers' clean-up."""
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=False)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(cleanup=False)
  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  tok.train_from_iterator(
    CORPUS + ["Hello , world . isn't it ? yes !"],
    trainers.WordPieceTrainer(
      vocab_size=300, special_tokens=specials, show_progress=False
    ),
  )
  tok.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]",
    special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")],
  )
  return tok


def _bos_processor(tok: Tokenizer, bos: str):
  return processors.TemplateProcessing(
    single=f"{bos} $A",
    pair=f"{bos} $A {bos} $B",
    special_tokens=[(bos, tok.token_to_id(bos))],
  )


def _write(directory, tok: Tokenizer, config: dict, **extra) -> str:
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  files = {"tokenizer_config.json": config, **extra}
  for name, content in files.items():
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
      if isinstance(content, str):
        f.write(content)
      else:
        json.dump(content, f, ensure_ascii=False, indent=1)
  return str(directory)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """Tokenizer directories by family name."""
  root = tmp_path_factory.mktemp("hf")
  byte, meta = _byte_level(), _metaspace()
  bid, mid = byte.token_to_id, meta.token_to_id
  out = {}

  byte.post_processor = processors.Sequence(
    [
      processors.ByteLevel(trim_offsets=False),
      _bos_processor(byte, "<|begin_of_text|>"),
    ]
  )
  out["llama3"] = _write(
    root / "llama3",
    byte,
    {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": "<|begin_of_text|>",
      "eos_token": "<|end_of_text|>",
      "clean_up_tokenization_spaces": True,  # ignored for BPE, as in HF
      "chat_template": LLAMA3_TEMPLATE,
    },
    **{
      "generation_config.json": {
        "bos_token_id": bid("<|begin_of_text|>"),
        "eos_token_id": [bid("<|end_of_text|>"), bid("<|eot_id|>")],
      }
    },
  )

  byte.post_processor = processors.ByteLevel(trim_offsets=False)
  out["qwen"] = _write(
    root / "qwen",
    byte,
    {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": None,
      "eos_token": "<|im_end|>",
      "pad_token": "<|endoftext|>",
      "unk_token": None,
      "chat_template": [
        {"name": "default", "template": CHATML_TEMPLATE},
        {"name": "tool_use", "template": TOOLS_TEMPLATE},
      ],
    },
    **{
      "generation_config.json": {
        "bos_token_id": bid("<|endoftext|>"),
        "eos_token_id": [bid("<|im_end|>"), bid("<|endoftext|>")],
        "pad_token_id": bid("<|endoftext|>"),
      }
    },
  )

  meta.post_processor = _bos_processor(meta, "<bos>")
  token = lambda s: {"content": s, "special": True, "normalized": False}
  out["gemma"] = _write(
    root / "gemma",
    meta,
    {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": token("<bos>"),
      "eos_token": token("<eos>"),
      "pad_token": token("<pad>"),
      "unk_token": token("<unk>"),
      "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
      "chat_template": GEMMA_TEMPLATE,
      "add_bos_token": True,
    },
    **{
      "special_tokens_map.json": {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
      },
      "generation_config.json": {
        "eos_token_id": [mid("<eos>"), mid("<end_of_turn>")],
        "pad_token_id": mid("<pad>"),
      },
    },
  )

  meta.post_processor = None  # the config's add_bos_token decides
  out["llama2"] = _write(
    root / "llama2",
    meta,
    {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": "<s>",
      "eos_token": "</s>",
      "unk_token": "<unk>",
      "add_bos_token": True,
      "chat_template": TOOLS_TEMPLATE,
    },
  )
  out["bert"] = _write(
    root / "bert",
    _wordpiece(),
    {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "cls_token": "[CLS]",
      "sep_token": "[SEP]",
      "eos_token": "[SEP]",
      "pad_token": "[PAD]",
      "unk_token": "[UNK]",
      "mask_token": "[MASK]",
      "clean_up_tokenization_spaces": True,
    },
  )
  return out


@pytest.fixture(scope="module")
def ours(dirs):
  return {k: load_tokenizer_dir(d) for k, d in dirs.items()}


@pytest.fixture(scope="module")
def theirs(dirs):
  load = transformers.AutoTokenizer.from_pretrained
  return {k: load(d) for k, d in dirs.items()}


TEXTS = [
  "Hello world",
  "helloworld",
  "naïve café déjà vu — 中文 文本 🙂 ünïcödé ∑",
  "digits 0123456789 and 3.14159, -42",
  "  leading and   inner   runs\t\ttabs\n\n\nnewlines  ",
  " ",
  "",
  "special <|eot_id|> inside<|im_end|>text <bos>x<end_of_turn>\n",
  "<s>[INST] hi [/INST] there</s>",
  "unseen bytes: \u0000\u00ff\U0001f680 ☃",
  "Hello , world . isn't it ? yes !",
]


@pytest.mark.parametrize(
  "family", ["llama3", "qwen", "gemma", "llama2", "bert"]
)
def test_encode_decode_match_transformers(ours, theirs, family):
  tok, ref = ours[family], theirs[family]
  assert tok.vocab_size == len(ref)
  for text in TEXTS:
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False), text
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    with_specials = [*tok.bos_prefix, *ids, *tok.eos_ids, tok.pad_id]
    assert tok.decode(np.asarray(with_specials)) == ref.decode(
      with_specials, skip_special_tokens=True
    )
    assert [tok.id_to_piece(i) for i in ids] == ref.convert_ids_to_tokens(ids)


def test_special_ids(ours, theirs):
  l3, qw, ge, l2 = (ours[k] for k in ("llama3", "qwen", "gemma", "llama2"))
  for k, tok in ours.items():
    ref = theirs[k]
    assert tok.eos_id == ref.eos_token_id
    assert tok.bos_id == ref.bos_token_id
    assert tok.unk_id == ref.unk_token_id
  # Llama 3: no pad token -> pad = eos; generation_config adds <|eot_id|>.
  assert theirs["llama3"].pad_token_id is None
  assert l3.pad_id == l3.eos_id == l3._backend.token_to_id("<|end_of_text|>")
  assert l3.eos_ids == (l3.eos_id, l3._backend.token_to_id("<|eot_id|>"))
  # Qwen: an explicit null bos wins over generation_config's bos_token_id.
  assert qw.bos_id is None and qw.unk_id is None
  assert qw.pad_id == theirs["qwen"].pad_token_id != qw.eos_id
  assert qw.eos_ids == (qw.eos_id, qw.pad_id)
  # Gemma: AddedToken dicts; <end_of_turn> ends generation too.
  assert ge.pad_id == theirs["gemma"].pad_token_id
  assert ge.eos_ids == (ge.eos_id, ge._backend.token_to_id("<end_of_turn>"))
  assert l2.pad_id == l2.eos_id and l2.eos_ids == (l2.eos_id,)
  with pytest.raises(ValueError, match="no mask token"):
    _ = l3.mask_id
  assert ours["bert"].mask_id == theirs["bert"].mask_token_id


def test_bos_prefix(ours, theirs):
  for k in ("llama3", "gemma"):  # from the post-processor / add_bos_token
    ids = theirs[k].encode("Hello world")  # add_special_tokens=True
    assert ours[k].bos_prefix == [ours[k].bos_id] == ids[:1]
  assert ours["qwen"].bos_prefix == []
  assert theirs["qwen"].encode("Hello") == ours["qwen"].encode("Hello")
  # llama2: no post-processor; the config's add_bos_token says bos.
  assert ours["llama2"].bos_prefix == [ours["llama2"].bos_id]


def test_bos_prefix_probed_without_add_bos_token(dirs, tmp_path):
  d = tmp_path / "probe"
  tok = Tokenizer.from_file(os.path.join(dirs["gemma"], "tokenizer.json"))
  _write(d, tok, {"bos_token": "<bos>", "eos_token": "<eos>"})
  probed = load_tokenizer_dir(d)
  assert probed.bos_prefix == [tok.token_to_id("<bos>")]
  assert probed.pad_id == probed.eos_id  # no pad anywhere


def test_eos_from_generation_config_and_missing_eos(dirs, tmp_path):
  tok = Tokenizer.from_file(os.path.join(dirs["qwen"], "tokenizer.json"))
  eot = tok.token_to_id("<|eot_id|>")
  _write(
    tmp_path / "gen",
    tok,
    {"bos_token": None},
    **{"generation_config.json": {"eos_token_id": eot}},
  )
  t = load_tokenizer_dir(tmp_path / "gen")
  assert t.eos_id == t.pad_id == eot and t.eos_ids == (eot,)
  _write(
    tmp_path / "pad", tok, {"eos_token": "<|im_end|>", "pad_token": "<no>"}
  )
  t = load_tokenizer_dir(tmp_path / "pad")  # a pad not in the vocab
  assert t.pad_id == t.eos_id
  _write(tmp_path / "bad", tok, {"eos_token": "<no>"})
  with pytest.raises(ValueError, match="eos_token '<no>'.*not in the vocab"):
    load_tokenizer_dir(tmp_path / "bad")
  _write(tmp_path / "none", tok, {})
  with pytest.raises(ValueError, match="no eos token") as e:
    load_tokenizer_dir(tmp_path / "none")
  for name in ("tokenizer_config", "special_tokens_map", "generation_config"):
    assert os.path.join(str(tmp_path / "none"), name + ".json") in str(e.value)


# ------------------------------------------------------------ segments


def test_split_by_offsets_rules():
  # bounds: "ab" | "cd" | "" | "ef"; last character decides; empty spans
  # go with the next token that covers a character.
  spans = [(0, 0), (0, 1), (1, 3), (3, 4), (4, 4), (4, 6)]
  assert split_by_offsets(spans, [2, 4, 4, 6]) == [0, 0, 1, 1, 3, 3]


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_encode_segments_concatenate_to_joined(ours, family):
  tok = ours[family]
  cases = [
    ["add: 12 + 3 =", " 15"],
    ["hello", "world", "!"],
    ["Q: café", "déjà 🙂", "", "<|im_end|>\n"],
    ["a  ", "  b\t", "\n\nc"],
    ["", ""],
  ]
  for texts in cases:
    parts = tok.encode_segments(texts)
    assert len(parts) == len(texts)
    assert sum(parts, []) == tok.encode("".join(texts)), texts
  assert tok.encode_segments([]) == []


def test_boundary_by_offsets_where_apart_differs(ours):
  """Both styles merge across "hello|world"; the boundary token goes to the
  completion (its last character is there), so the completion is trained
  from its first character on."""
  for family in ("qwen", "gemma"):
    tok = ours[family]
    prompt, completion = "say: hello", "world"
    apart = tok.encode(prompt) + tok.encode(completion)
    joined = tok.encode(prompt + completion)
    assert apart != joined  # such a case exists for this tokenizer
    p, c = tok.encode_segments([prompt, completion])
    assert p + c == joined
    assert "world" in tok.decode(c) and "say:" not in tok.decode(c)
    assert tok.decode(p) + tok.decode(c) == tok.decode(joined)


def test_sentencepiece_segments_equal_joined_on_builtin_suite(suite_dir):
  tok = SPTokenizer.load(suite_dir / "tok.model")
  for task in tasks.TASKS:
    for ex in tasks.generate(task, 50, seed=2, split="train"):
      texts = [ex["prompt"], ex["completion"]]
      parts = tok.encode_segments(texts)
      assert parts == [tok.encode(t) for t in texts]
      assert sum(parts, []) == tok.encode("".join(texts))
  assert tok.bos_prefix == [tok.bos_id] and tok.eos_ids == (tok.eos_id,)
  assert tok.chat_template is None


# ------------------------------------------------------------ templates

CONVERSATIONS = [
  [
    {"role": "user", "content": "add: 12 + 3 ="},
    {"role": "assistant", "content": " 15"},
  ],
  [
    {"role": "system", "content": 'Be brief. Use <tags> & "quotes".'},
    {"role": "user", "content": "  copy: a b =  "},
    {"role": "assistant", "content": "a b\n"},
    {"role": "user", "content": "héllo 🙂"},
    {"role": "assistant", "content": "hi", "tool_calls": None},
  ],
  [{"role": "user", "content": "only a question"}],
]
TOOLS = [
  {
    "type": "function",
    "function": {
      "name": "lookup",
      "description": "Find <x> & 'y' in the café",
      "parameters": {"type": "object", "properties": {"q": {"type": "str"}}},
    },
  }
]


@pytest.mark.parametrize("family", CHAT_FAMILIES)
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_matches_transformers(ours, theirs, family, gen):
  tok, ref = ours[family], theirs[family]
  for msgs in CONVERSATIONS:
    got = tok.apply_chat_template(msgs, add_generation_prompt=gen)
    want = ref.apply_chat_template(
      msgs, tokenize=False, add_generation_prompt=gen
    )
    assert got == want, (family, msgs)
  if family in ("llama2", "qwen"):  # tools, tojson, namespace, dict, break
    # qwen's list of templates has a "tool_use" one, picked when tools are
    # passed; llama2's one template reads them too.
    msgs = CONVERSATIONS[1] + [
      {"role": "assistant", "content": "STOP"},
      {"role": "user", "content": "after break"},
    ]
    got = tok.apply_chat_template(msgs, gen, tools=TOOLS)
    want = ref.apply_chat_template(
      msgs, tools=TOOLS, tokenize=False, add_generation_prompt=gen
    )
    assert got == want
    assert "<x> & 'y'" in got and "café" in got  # tojson: no escaping
    assert "after break" not in got and ("turns=2" in got) == gen


def test_template_list_uses_default_and_kwargs_reach_it(ours):
  qw = ours["qwen"]
  assert qw.chat_template == CHATML_TEMPLATE
  text = qw.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True)
  assert text.startswith("<|im_start|>system\nYou are a helpful assistant.")
  assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
  year = chat.render("{{ strftime_now('%Y') }}|{{ x }}", [], name="t", x=7)
  assert year == f"{datetime.datetime.now().year}|7"


def test_template_errors_name_the_file(ours, dirs, suite_dir):
  bad_roles = [
    {"role": "user", "content": "a"},
    {"role": "user", "content": "b"},
  ]
  config = os.path.join(dirs["gemma"], "tokenizer_config.json")
  with pytest.raises(ValueError, match="Roles must alternate") as e:
    ours["gemma"].apply_chat_template(bad_roles)
  assert config in str(e.value)
  with pytest.raises(ValueError, match="TemplateSyntaxError") as e:
    chat.render("{% for x in %}", [], name="my/tokenizer_config.json")
  assert "my/tokenizer_config.json" in str(e.value)
  with pytest.raises(ValueError, match="no chat template"):
    SPTokenizer.load(suite_dir / "tok.model").apply_chat_template([])


# ------------------------------------------------------------ SFT, DPO


def _config(objective, **sft_keys):
  c = base_config()
  c.objective = objective
  c.seq_len = 512
  for k, v in sft_keys.items():
    c.sft[k] = v
  return c


def _rec(d, where="chat.jsonl:3"):
  r = Record(d)
  r.where = where
  return r


def _trained_text(tok, ex):
  """Decoded runs of trained tokens (weights are on targets)."""
  ids = np.concatenate([ex["inputs"][:1], ex["targets"]])
  w = np.concatenate([[0.0], ex["weights"]])
  runs, cur = [], []
  for i, m in zip(ids, w, strict=True):
    if m:
      cur.append(int(i))
    elif cur:
      runs.append(cur)
      cur = []
  if cur:
    runs.append(cur)
  return ids, [tok._backend.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.parametrize(
  "family, end",
  [
    ("llama3", "<|eot_id|>"),
    ("qwen", "<|im_end|>"),
    ("gemma", "<end_of_turn>\n"),
  ],
)
def test_sft_chat_trains_exactly_the_assistant_spans(
  suite_dir, ours, family, end
):
  tok = ours[family]
  obj = sft.SFT(_config("sft"), tok)
  assert obj.template is tok  # 'auto' picks the tokenizer's template
  msgs = CONVERSATIONS[1]
  (ex,) = obj.make_examples([_rec({"messages": msgs})])
  ids, runs = _trained_text(tok, ex)
  want = [
    m["content"].strip() if family != "qwen" else m["content"]
    for m in msgs
    if m["role"] == "assistant"
  ]
  assert runs == [w + end for w in want]
  # The sequence is the rendered chat tokenized once, no bos/eos added.
  full = tok.apply_chat_template(msgs)
  assert list(ids) == tok.encode(full)
  assert tok.bos_prefix == list(ids[: len(tok.bos_prefix)])


def test_sft_template_modes_and_prefix_stability(
  suite_dir, ours, dirs, tmp_path
):
  tok = ours["llama3"]
  table = sft.SFT(_config("sft", template="table"), tok)
  assert isinstance(table.template, dict)
  (ex,) = table.make_examples([_rec({"messages": CONVERSATIONS[0]})])
  assert ex["inputs"][0] == tok.bos_id  # bos_prefix, then the role table
  assert ex["targets"][-1] == tok.eos_id
  sp = SPTokenizer.load(suite_dir / "tok.model")
  with pytest.raises(ValueError, match="has no chat template"):
    sft.SFT(_config("sft", template="tokenizer"), sp)
  with pytest.raises(ValueError, match="unknown 'chatml'"):
    sft.SFT(_config("sft", template="chatml"), sp)
  # A template that ends only the last turn with eos is not prefix-stable.
  src = Tokenizer.from_file(os.path.join(dirs["qwen"], "tokenizer.json"))
  _write(
    tmp_path / "unstable",
    src,
    {"eos_token": "<|endoftext|>", "chat_template": PREFIX_UNSTABLE_TEMPLATE},
  )
  unstable = load_tokenizer_dir(tmp_path / "unstable")
  obj = sft.SFT(_config("sft"), unstable)
  with pytest.raises(DataError, match="not prefix-stable") as e:
    obj.make_examples([_rec({"messages": CONVERSATIONS[1]}, "c.jsonl:9")])
  assert "c.jsonl:9" in str(e.value)
  # A raise_exception in the template names the row too.
  gemma = sft.SFT(_config("sft"), ours["gemma"])
  two_users = [{"role": "user", "content": "a"}] * 2 + [
    {"role": "assistant", "content": "b"}
  ]
  with pytest.raises(DataError, match="c.jsonl:4.*alternate"):
    gemma.make_examples([_rec({"messages": two_users}, "c.jsonl:4")])


def test_sft_warns_when_turns_do_not_end_in_a_stop_token(
  dirs, tmp_path, capsys
):
  assert sft.turns_end_in_stop([1, 5, 2, 9, 5], [0, 1, 1, 0, 1], (5,))
  assert not sft.turns_end_in_stop([1, 5, 2, 9, 4], [0, 1, 1, 0, 1], (5,))
  # A base model's eos is <|endoftext|>; its template ends turns otherwise.
  src = Tokenizer.from_file(os.path.join(dirs["qwen"], "tokenizer.json"))
  _write(
    tmp_path / "base",
    src,
    {"eos_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE},
  )
  tok = load_tokenizer_dir(tmp_path / "base")
  sft.SFT(_config("sft"), tok).make_examples(
    [_rec({"messages": CONVERSATIONS[0]})]
  )
  assert "none of the tokens that end generation" in capsys.readouterr().out
  sft.SFT(_config("sft"), tok).make_examples(
    [_rec({"prompt": "a", "completion": "b"})]  # eos appended: no warning
  )
  assert "warning" not in capsys.readouterr().out


def test_clm_sequences_start_with_bos_prefix(ours):
  for family, bos in (("llama3", True), ("qwen", False)):
    tok = ours[family]
    (ex,) = clm.CLM(_config("clm"), tok).make_examples([{"text": "hi there"}])
    ids = [*ex["inputs"], ex["targets"][-1]]
    assert ids == [*tok.bos_prefix, *tok.encode("hi there"), tok.eos_id]
    assert (ids[0] == tok.bos_id) == bos


def test_sft_prompt_completion_boundary_by_offsets(suite_dir, ours):
  tok = ours["qwen"]
  obj = sft.SFT(_config("sft"), tok)
  (ex,) = obj.make_examples(
    [_rec({"prompt": "say: hello", "completion": "world"})]
  )
  ids, runs = _trained_text(tok, ex)
  assert list(ids) == tok.encode("say: helloworld") + [tok.eos_id]  # no bos
  assert len(runs) == 1 and runs[0].endswith("<|im_end|>")
  assert "world" in runs[0] and "say" not in runs[0]


def test_dpo_prompt_ids_differ_apart_and_are_cut_to_the_common_prefix(ours):
  tok = ours["qwen"]
  prompt, chosen, rejected = "say: hello", "world", " there"
  p_c, _ = tok.encode_segments([prompt, chosen])  # "hello|world" merges
  p_r, _ = tok.encode_segments([prompt, rejected])
  assert p_c != p_r and p_r[: len(p_c)] == p_c
  p, c, r = dpo.pair_ids(tok, prompt, chosen, rejected)
  assert p == p_c  # the longest common prefix
  assert p + c == tok.encode(prompt + chosen)
  assert p + r == tok.encode(prompt + rejected)
  obj = dpo.DPO(_config("dpo"), tok)
  (ex,) = obj.make_examples(
    [_rec({"prompt": prompt, "chosen": chosen, "rejected": rejected})]
  )
  for pre, comp in (("", chosen), ("rej_", rejected)):
    ids = [*ex[pre + "inputs"][:1], *ex[pre + "targets"]]
    w = ex[pre + "weights"]
    n = len(p) - 1  # targets that are prompt tokens (no bos for Qwen)
    assert ids[: len(p)] == p and not w[:n].any() and w[n] == 1.0
    trained = ex[pre + "targets"][w > 0].tolist()
    assert trained == [*(c if pre == "" else r), tok.eos_id]
    assert tok.decode(trained).endswith(comp)


def test_dpo_chosen_and_rejected_share_prompt_ids(ours):
  tok = ours["gemma"]
  obj = dpo.DPO(_config("dpo"), tok)
  rows = [
    _rec({"prompt": "say: hello", "chosen": "world", "rejected": " there"}),
    _rec(
      {
        "prompt": [{"role": "user", "content": "add: 1 + 2 ="}],
        "chosen": [{"role": "assistant", "content": "3"}],
        "rejected": [{"role": "assistant", "content": "4"}],
      }
    ),
  ]
  plain, templated = obj.make_examples(rows)
  for ex in (plain, templated):
    n = int(np.argmax(ex["weights"] > 0))  # first trained target
    assert n == int(np.argmax(ex["rej_weights"] > 0))
    np.testing.assert_array_equal(
      ex["inputs"][: n + 1], ex["rej_inputs"][: n + 1]
    )
  assert plain["inputs"][0] == tok.bos_id
  assert plain["targets"][plain["weights"] > 0][-1] == tok.eos_id
  # Templated: the template's text, its bos, its end of turn; no eos added.
  msgs = rows[1]["prompt"] + rows[1]["chosen"]
  full = tok.encode(tok.apply_chat_template(msgs))
  assert full[0] == tok.bos_id
  n = len(full) - 1
  np.testing.assert_array_equal(templated["targets"][:n], full[1:])
  trained = templated["targets"][templated["weights"] > 0]
  assert tok._backend.decode(trained.tolist(), skip_special_tokens=False) == (
    "3<end_of_turn>\n"
  )


# ------------------------------------------------------------ files


def test_loader_errors(tmp_path, dirs):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError) as e:
    load_tokenizer_dir(empty)
  for name in (str(empty), "tokenizer.json", "tokenizer.model"):
    assert name in str(e.value)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
  with pytest.raises(ValueError, match="not a valid tokenizer.json") as e:
    load_tokenizer_dir(bad)
  assert str(bad / "tokenizer.json") in str(e.value)
  (bad / "tokenizer.json").write_bytes(
    open(os.path.join(dirs["qwen"], "tokenizer.json"), "rb").read()
  )
  (bad / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer_config.json: invalid JSON"):
    load_tokenizer_dir(bad)
  with pytest.raises(FileNotFoundError, match="nope.json"):
    load_tokenizer_file(tmp_path / "nope.json")


def test_load_file_and_dir_pick_the_class(suite_dir, dirs):
  jft_tok = load_tokenizer_file(suite_dir / "tok.model")
  assert type(jft_tok) is SPTokenizer  # jft's own: strict
  json_tok = load_tokenizer_file(os.path.join(dirs["llama3"], "tokenizer.json"))
  assert isinstance(json_tok, hft.HFTokenizer)
  assert json_tok.eos_ids == load_tokenizer_dir(dirs["llama3"]).eos_ids


def test_save_round_trip_and_pickle(ours, tmp_path, suite_dir):
  for family, tok in ours.items():
    d = tmp_path / family
    paths = tok.save(d)
    names = sorted(os.path.basename(p) for p in paths)
    gen = ["generation_config.json"] * (family in ("llama3", "qwen", "gemma"))
    assert names == sorted([*tok.files, *gen])
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(tok.files)
    again = load_tokenizer_dir(d)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone._backend_cache is None  # rebuilt lazily
    for other in (again, clone):
      assert other.files == tok.files
      assert other.eos_ids == tok.eos_ids and other.pad_id == tok.pad_id
      assert other.bos_prefix == tok.bos_prefix
      for text in TEXTS:
        assert other.encode(text) == tok.encode(text)
      assert other.chat_template == tok.chat_template
      if tok.chat_template:
        conv = CONVERSATIONS[0]
        assert other.apply_chat_template(conv) == tok.apply_chat_template(conv)
  # A model export's own generation_config.json is never overwritten.
  export = tmp_path / "export"
  export.mkdir()
  own = export / "generation_config.json"
  own.write_text('{"eos_token_id": 1}')
  ours["gemma"].save(export)
  assert own.read_text() == '{"eos_token_id": 1}'
  sp = SPTokenizer.load(suite_dir / "tok.model")
  (path,) = sp.save(tmp_path / "sp")
  assert path.endswith("tokenizer.model")
  assert type(load_tokenizer_dir(tmp_path / "sp")) is SPTokenizer


def test_sentencepiece_hf_checkpoint(tmp_path, suite_dir):
  """An HF checkpoint with only tokenizer.model: specials from its config,
  pad = eos, special-token text matched, offsets-based segments."""
  d = tmp_path / "spck"
  d.mkdir()
  src = SPTokenizer.load(suite_dir / "tok.model")
  (d / "tokenizer.model").write_bytes(src.model_proto)
  (d / "tokenizer_config.json").write_text(
    json.dumps(
      {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": LLAMA3_TEMPLATE,
      }
    )
  )
  tok = load_tokenizer_dir(d)
  assert isinstance(tok, hft.HFSentencePieceTokenizer)
  assert (tok.bos_id, tok.eos_id, tok.unk_id) == (2, 3, 1)
  assert tok.pad_id == tok.eos_id and tok.bos_prefix == [2]
  ids = tok.encode("add: 1 + 2 =</s> 3")
  assert tok.eos_id in ids and tok.decode(ids) == "add: 1 + 2 = 3"
  texts = ["add: 1", "2 + 3 =", " 5"]
  assert sum(tok.encode_segments(texts), []) == tok.encode("".join(texts))
  assert tok.apply_chat_template(CONVERSATIONS[0]).startswith("<s><|start")
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode("copy: a b =</s>") == tok.encode("copy: a b =</s>")
  assert set(tok.files) == {
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
  }
