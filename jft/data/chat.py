"""Hugging Face chat templates: rendering, and the assistant spans of a chat.

`render` gives the text transformers' `tokenizer.apply_chat_template(...,
tokenize=False)` gives for the same template, messages and special tokens:
a Jinja2 `ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True)` with the `loopcontrols` extension, a `tojson` filter
that does not HTML-escape, `raise_exception` and `strftime_now` globals,
restricted `dict`/`namespace`, `{% generation %}` blocks rendered as their
body, and the variables `messages` (message keys whose value is None
dropped), `tools`, `documents`, `add_generation_prompt`, the tokenizer's
named special tokens (`bos_token`, `eos_token`, ...) and any extra keyword
arguments (which win over the special tokens). Templates are untrusted code
from the Hub, hence the sandbox.

`assistant_spans` finds what SFT trains in a chat: each assistant turn is
rendered incrementally (the text of `messages[:i]` with the generation prompt
is the prompt of turn i; the text of `messages[:i + 1]` ends it), so the span
is the turn's content plus the template's own end-of-turn text.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

from jft.data.jsonl import DataError

Messages = Sequence[Mapping[str, Any]]


class _Generation(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` renders its body unchanged.

  transformers uses these blocks to mark assistant text; jft finds assistant
  spans by incremental rendering instead, so the tag only has to parse.
  """

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    call = self.call_method("_body")
    return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(
  x, ensure_ascii=False, indent=None, separators=None, sort_keys=False
):
  # Jinja's own tojson escapes <, >, & and ' for HTML; chat text must not be.
  return json.dumps(
    x,
    ensure_ascii=ensure_ascii,
    indent=indent,
    separators=separators,
    sort_keys=sort_keys,
  )


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


class _Dict:
  """`dict(...)` for templates without the class itself (no type tricks)."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


def _check_attr(name):
  if isinstance(name, str) and name.startswith("_"):
    raise jinja2.exceptions.SecurityError(
      f"chat templates may not set underscore attributes ({name!r})"
    )


class _Namespace(jinja2.utils.Namespace):
  """`namespace(...)` that refuses underscore (dunder) attributes."""

  def __init__(*args, **kwargs):  # no `self`: Jinja's signature trick
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _check_attr(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _check_attr(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)


def _environment() -> jinja2.Environment:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True,
    lstrip_blocks=True,
    extensions=[jinja2.ext.loopcontrols, _Generation],
  )
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  env.globals["dict"] = _Dict()
  env.globals["namespace"] = _Namespace
  return env


_ENV = _environment()


@functools.lru_cache(maxsize=16)
def _compiled(source: str) -> jinja2.Template:
  return _ENV.from_string(source)


def compile_template(source: str, name: str) -> jinja2.Template:
  """The compiled template; a syntax error names `name` (its file)."""
  try:
    return _compiled(source)
  except jinja2.TemplateError as e:
    raise ValueError(f"chat template of {name}: {_describe(e)}") from None


def _describe(e: Exception) -> str:
  line = getattr(e, "lineno", None)
  kind = type(e).__name__
  return f"{kind}{f' (template line {line})' if line else ''}: {e}"


def render(
  source: str,
  messages: Messages,
  *,
  name: str,
  special_tokens: Mapping[str, str] | None = None,
  add_generation_prompt: bool = False,
  **kwargs,
) -> str:
  """The chat as text, as transformers renders it (see module docstring).

  Any template error (syntax, `raise_exception`, undefined access, sandbox)
  becomes one ValueError naming `name`, the file the template came from.
  """
  template = compile_template(source, name)
  msgs = []
  for m in messages:
    if not isinstance(m, Mapping):
      raise ValueError(f"chat messages must be dicts, got {m!r}")
    msgs.append({k: v for k, v in m.items() if v is not None})
  variables = {
    "tools": None,
    "documents": None,
    **(special_tokens or {}),
    **kwargs,
    "messages": msgs,
    "add_generation_prompt": add_generation_prompt,
  }
  try:
    return template.render(**variables)
  except Exception as e:  # template code is the file's: name it, whatever broke
    raise ValueError(f"chat template of {name}: {_describe(e)}") from None


Render = Callable[[Messages, bool], str]


def assistant_spans(
  render_fn: Render, messages: Messages, where: str
) -> tuple[str, list[tuple[int, int]]]:
  """(text of the whole chat, [start, end) character span of each assistant
  turn), by rendering the chat incrementally with `render_fn(messages,
  add_generation_prompt)`.

  Each prefix render must be a prefix of the next and of the whole text, or
  the turn's tokens would not be the ones the model sees at inference; when
  it is not (e.g. a template that rewrites earlier turns), raise a DataError
  naming `where`.
  """
  full = _render_row(render_fn, messages, False, where)
  spans, last_end = [], 0
  for i, m in enumerate(messages):
    if m.get("role") != "assistant":
      continue
    before = _render_row(render_fn, messages[:i], True, where)
    after = _render_row(render_fn, messages[: i + 1], False, where)
    if not (after.startswith(before) and full.startswith(after)):
      raise DataError(
        f"{where}: the chat template is not prefix-stable at messages[{i}] "
        "(rendering the chat up to this assistant turn is not a prefix of "
        "rendering it whole), so its tokens cannot be masked; use "
        "config.sft.template='table' or a prefix-stable template"
      )
    if len(before) < last_end:
      raise DataError(
        f"{where}: the chat template's generation prompt for messages[{i}] "
        "overlaps the previous assistant turn"
      )
    spans.append((len(before), len(after)))
    last_end = len(after)
  return full, spans


def split_reply(
  render_fn: Render, prompt: Messages, reply: Mapping[str, Any], where: str
) -> tuple[str, str]:
  """(prompt text with the generation prompt, reply text) of a chat whose
  last message is `reply`; the reply text runs to the end of the render
  (its content and the template's end-of-turn text)."""
  before = _render_row(render_fn, prompt, True, where)
  full = _render_row(render_fn, [*prompt, reply], False, where)
  if not full.startswith(before):
    raise DataError(
      f"{where}: the chat template is not prefix-stable (rendering the "
      "prompt with its generation prompt is not a prefix of rendering it "
      "with the reply), so the reply's tokens cannot be found"
    )
  return before, full[len(before) :]


def _render_row(render_fn, messages, add_generation_prompt, where) -> str:
  try:
    return render_fn(list(messages), add_generation_prompt)
  except ValueError as e:
    raise DataError(f"{where}: {e}") from None
