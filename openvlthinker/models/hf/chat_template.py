"""A checkpoint's jinja chat template, rendered as transformers renders it, and chat prompts.

`render` builds the same sandboxed jinja environment as transformers' apply_chat_template
(trim_blocks, lstrip_blocks, loop controls, `raise_exception`, a `tojson` that does not escape
HTML, `strftime_now`, `dict`, a namespace refusing underscore names, `{% generation %}` blocks
rendered as their body). `load_template` finds the template where transformers' processor looks;
`encode_chat` tokenises one user turn with images the way the Qwen-VL processor does.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

from openvlthinker.fields import FieldError, check
from openvlthinker.models.hf import image_processor

TEMPLATE_FILE = "chat_template.jinja"
LEGACY_TEMPLATE_FILE = "chat_template.json"
PROCESSOR_FILE = "processor_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _Generation(jinja2.ext.Extension):
  """`{% generation %}…{% endgeneration %}` renders its body (transformers uses it to find the
  assistant's tokens; a plain render needs only the text)."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


class _Namespace(jinja2.utils.Namespace):
  """jinja's namespace() refusing underscore-prefixed attributes, as transformers' does."""

  def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(
          f"chat templates cannot store underscore-prefixed attributes, got {name!r}")


class _Dict:
  """`dict(...)` and `dict.fromkeys(...)` for templates, without the type itself."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                     namespace=_Namespace)
  return env.from_string(template)


def _plain(value: Any) -> Any:
  """Template data rebuilt from JSON types; anything else (an image, an array) becomes an inert
  "<TypeName>" placeholder, which templates only test for presence (transformers does this too)."""
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, str):
    return str.__str__(value)
  if isinstance(value, int):
    return int.__int__(value)
  if isinstance(value, float):
    return float.__float__(value)
  if isinstance(value, Mapping):
    return {_plain(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_plain(v) for v in value]
  if isinstance(value, tuple):
    return tuple(_plain(v) for v in value)
  if isinstance(value, np.generic):
    return _plain(value.item())
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
  return f"<{type(value).__name__}>"


def _message(message: Mapping[str, Any]) -> dict:
  """A message as transformers hands it to the template: None-valued keys dropped, reasoning
  aliased under every name templates read it by."""
  check(isinstance(message, Mapping), "messages", "dicts", message)
  message = _plain({k: v for k, v in message.items() if v is not None})
  reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
  if reasoning is not None:
    message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
  return message


def render(template: str, messages: Sequence[Mapping[str, Any]],
           add_generation_prompt: bool = True, **kwargs) -> str:
  """The chat `messages` as text, as transformers' apply_chat_template(tokenize=False) renders
  them. kwargs reach the template as variables (e.g. tools: a list of JSON schemas; transformers
  also passes the tokenizer's named special tokens: give `**tokenizer.special_tokens_map`)."""
  variables = {"tools": None, "documents": None, **_plain(kwargs)}
  return _compile(template).render(messages=[_message(m) for m in messages],
                                   add_generation_prompt=add_generation_prompt, **variables)


def _default(templates: Any, where: str) -> str:
  """The default template of a template entry: a string, {name: template} or [{name, template}]."""
  if isinstance(templates, list):
    templates = {t.get("name"): t.get("template") for t in templates if isinstance(t, Mapping)}
  if isinstance(templates, Mapping):
    check("default" in templates, where, "a template named 'default'", sorted(templates))
    templates = templates["default"]
  check(isinstance(templates, str), where, "a template string", type(templates).__name__)
  return templates


def _json_entry(path: str, key: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise FieldError(os.path.basename(path), "a readable json file", f"{path} ({e})") from None
  return d.get(key) if isinstance(d, dict) else None


def load_template(path: str | os.PathLike) -> str:
  """The chat template of the checkpoint directory `path`, found as transformers' processor
  finds it: processor_config.json's "chat_template", else chat_template.json (legacy), else
  chat_template.jinja; a directory with none of them falls back to tokenizer_config.json's
  "chat_template" (the tokenizer's template). Named templates resolve to "default"."""
  path = os.fspath(path)
  processor = os.path.join(path, PROCESSOR_FILE)
  if os.path.isfile(processor) and _json_entry(processor, "chat_template") is not None:
    return _default(_json_entry(processor, "chat_template"), f"{PROCESSOR_FILE}: chat_template")
  legacy = os.path.join(path, LEGACY_TEMPLATE_FILE)
  if os.path.isfile(legacy):
    return _default(_json_entry(legacy, "chat_template"), f"{LEGACY_TEMPLATE_FILE}: chat_template")
  jinja_file = os.path.join(path, TEMPLATE_FILE)
  if os.path.isfile(jinja_file):
    with open(jinja_file, encoding="utf-8") as f:
      return f.read()
  config = os.path.join(path, TOKENIZER_CONFIG_FILE)
  if os.path.isfile(config) and _json_entry(config, "chat_template") is not None:
    return _default(_json_entry(config, "chat_template"), f"{TOKENIZER_CONFIG_FILE}: chat_template")
  raise FieldError("chat template", f"{TEMPLATE_FILE}, {LEGACY_TEMPLATE_FILE} or a chat_template "
                   f"entry in {PROCESSOR_FILE} / {TOKENIZER_CONFIG_FILE}", path)


def user_turn(text: str, num_images: int) -> list[dict]:
  """One user message: the images, then the text (the content-list form Qwen templates read)."""
  content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
  return [{"role": "user", "content": content}]


def encode_chat(tokenizer, template: str, text: str,
                grids: Sequence[Sequence[int]], cfg: image_processor.ImageProcessorConfig,
                **kwargs) -> np.ndarray:
  """int32[L]: one user turn (the images, then `text`) with the generation prompt, tokenised,
  the i-th image token repeated tokens_per_image(grids[i]) times, as the Qwen-VL processor
  expands it. kwargs reach the template (e.g. enable_thinking)."""
  variables = {**getattr(tokenizer, "special_tokens_map", {}), **kwargs}
  prompt = render(template, user_turn(text, len(grids)), add_generation_prompt=True, **variables)
  ids = np.asarray(tokenizer.encode(prompt), np.int32)
  is_image = ids == tokenizer.image_id
  check(int(is_image.sum()) == len(grids), "image tokens",
        f"one per image ({len(grids)}) in the rendered prompt", int(is_image.sum()))
  counts = np.ones(len(ids), np.int64)
  counts[is_image] = [image_processor.tokens_per_image(g, cfg) for g in grids]
  return np.repeat(ids, counts)
