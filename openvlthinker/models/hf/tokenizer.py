"""A Hugging Face checkpoint's tokenizer as our `Tokenizer`, through the `tokenizers` package.

Reads a checkpoint directory's tokenizer.json and tokenizer_config.json (special_tokens_map.json
for what the config leaves out, generation_config.json for the stop ids). Special ids: eos is the
chat end token (<|im_end|> for Qwen) since a chat model ends its turn with it; `stop_ids` adds
every eos of the config and generation config; pad is the config's pad token, else <|endoftext|>;
bos is None when the checkpoint has none (Qwen). Encoding adds no special tokens and decoding
skips them, as transformers' encode(add_special_tokens=False) and decode(skip_special_tokens=True).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import tokenizers

from openvlthinker.data import tokenizer as tokenizer_lib
from openvlthinker.fields import FieldError, check

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
# The tags our prompts ask for and the rewards parse (openvlthinker.data.tokenizer).
THINKING_TAGS = (tokenizer_lib.THINKING_START, tokenizer_lib.THINKING_END)
ANSWER_TAGS = (tokenizer_lib.ANSWER_START, tokenizer_lib.ANSWER_END)
NO_ID = -1  # a tag's id when the tag is not one token (see HFTokenizer)
# transformers' named special tokens: what its apply_chat_template passes to the template.
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")


def _content(token: Any) -> str | None:
  """A special token as written in a config: a string or an AddedToken dict."""
  if isinstance(token, Mapping):
    token = token.get("content")
  return token if isinstance(token, str) else None


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise FieldError(os.path.basename(path), "a readable json file", f"{path} ({e})") from None
  check(isinstance(d, dict), os.path.basename(path), "a json object", type(d).__name__)
  return d


class HFTokenizer:
  """`openvlthinker.data.tokenizer.Tokenizer` over a HF tokenizer.json (+ its configs).

  Besides the protocol: `stop_ids` (every id that ends generation; decode stops at the first),
  `vision_start_id`, `vision_end_id`, `video_id` (None when absent), `special_tokens_map` (named
  special tokens as strings, what chat templates see) and, per tag, `*_ids`: the tag's encoding.
  Tags are the project's <thinking>/<answer> unless given; `*_id` is the tag's token id when the
  tag is one token (an added token such as Qwen3's <think>, or one BPE piece) and NO_ID (-1, which
  no sampled token equals) when the tag spans several tokens, in which case callers match
  `*_ids` as a sequence or look for the tag in decoded text.

  Picklable (grain workers): it keeps the json texts and rebuilds the backend on unpickle.
  """

  def __init__(self, tokenizer_json: str, config: Mapping[str, Any] | None = None,
               special_tokens_map: Mapping[str, Any] | None = None,
               generation_config: Mapping[str, Any] | None = None,
               thinking_tags: tuple[str, str] = THINKING_TAGS,
               answer_tags: tuple[str, str] = ANSWER_TAGS, chat_template: str | None = None):
    self._args = (tokenizer_json, dict(config or {}), dict(special_tokens_map or {}),
                  dict(generation_config or {}), tuple(thinking_tags), tuple(answer_tags),
                  chat_template)
    # The checkpoint's chat template: prompts are rendered with it (data.prompts.encode_text).
    self.chat_template = chat_template
    config, special, generation = self._args[1:4]
    self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    self._tok.no_padding()
    self._tok.no_truncation()
    self._tok.encode_special_tokens = bool(config.get("split_special_tokens", False))
    self._model_type = json.loads(tokenizer_json).get("model", {}).get("type")
    self._clean_up = bool(config.get("clean_up_tokenization_spaces", False))
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    # The config's named tokens win; special_tokens_map.json fills in what it leaves out.
    self.special_tokens_map = {}
    for key in _NAMED_SPECIAL:
      token = _content(config.get(key)) or _content(special.get(key))
      if token is not None:
        self._require(token, f"{CONFIG_FILE}: {key}")
        self.special_tokens_map[key] = token

    eos = CHAT_END if self._tok.token_to_id(CHAT_END) is not None else (
        self.special_tokens_map.get("eos_token"))
    check(eos is not None, f"{CONFIG_FILE}: eos_token", f"set, or a {CHAT_END} token", None)
    self.eos_id = self._require(eos, "eos")
    stops = [self.eos_id]
    gen_eos = generation.get("eos_token_id")
    for i in gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]:
      check(isinstance(i, int) and 0 <= i < self.vocab_size, f"{GENERATION_CONFIG_FILE}: "
            "eos_token_id", f"token ids below vocab_size={self.vocab_size}", gen_eos)
      stops.append(i)
    if "eos_token" in self.special_tokens_map:
      stops.append(self._tok.token_to_id(self.special_tokens_map["eos_token"]))
    self.stop_ids = tuple(dict.fromkeys(stops))

    pad = self.special_tokens_map.get("pad_token", END_OF_TEXT)
    self.pad_id = self._require(pad, f"{CONFIG_FILE}: pad_token (or {END_OF_TEXT})")
    bos = self.special_tokens_map.get("bos_token")
    self.bos_id = None if bos is None else self._tok.token_to_id(bos)
    self.image_id = self._require(IMAGE_PAD, "image token")
    self.vision_start_id = self._require(VISION_START, "vision start token")
    self.vision_end_id = self._require(VISION_END, "vision end token")
    self.video_id = self._tok.token_to_id(VIDEO_PAD)
    # Never sampled: the model's forward puts image features where these stand.
    self.placeholder_ids = tuple(i for i in (self.image_id, self.video_id, self.vision_start_id,
                                             self.vision_end_id) if i is not None)

    self.thinking_tags, self.answer_tags = self._args[4], self._args[5]
    for field, tags in (("thinking_tags", self.thinking_tags), ("answer_tags", self.answer_tags)):
      check(len(tags) == 2, field, "(start tag, end tag)", tags)
    for field, tag in zip(("thinking_start", "thinking_end", "answer_start", "answer_end"),
                          (*self.thinking_tags, *self.answer_tags)):
      check(isinstance(tag, str) and tag, f"{field} tag", "a non-empty string", tag)
      ids = tuple(self.encode(tag))
      setattr(self, f"{field}_ids", ids)
      setattr(self, f"{field}_id", ids[0] if len(ids) == 1 else NO_ID)
    self._stop_set = frozenset(self.stop_ids)
    self._drop = frozenset(i for i in (self.pad_id, self.bos_id) if i is not None)

  def _require(self, token: str, what: str) -> int:
    i = self._tok.token_to_id(token)
    check(i is not None, what, "a token of the tokenizer's vocabulary", token)
    return i

  @classmethod
  def from_dir(cls, path: str | os.PathLike, **kwargs) -> HFTokenizer:
    """The tokenizer of the checkpoint directory `path` (kwargs: thinking_tags, answer_tags)."""
    path = os.fspath(path)
    tokenizer_file = os.path.join(path, TOKENIZER_FILE)
    check(os.path.isfile(tokenizer_file), "tokenizer", f"a directory with a {TOKENIZER_FILE}",
          path)
    with open(tokenizer_file, encoding="utf-8") as f:
      text = f.read()
    optional = [os.path.join(path, name) for name in (CONFIG_FILE, SPECIAL_TOKENS_FILE,
                                                      GENERATION_CONFIG_FILE)]
    config, special, generation = (_read_json(p) if os.path.isfile(p) else {} for p in optional)
    if "chat_template" not in kwargs:
      from openvlthinker.models.hf import chat_template  # pylint: disable=g-import-not-at-top
      try:
        kwargs["chat_template"] = chat_template.load_template(path)
      except ValueError:  # a base checkpoint without one: prompts are plain text
        kwargs["chat_template"] = None
    return cls(text, config, special, generation, **kwargs)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def id_to_piece(self, i: int) -> str | None:
    return self._tok.id_to_token(int(i))

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added; special tokens in the text match."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` up to the first stop id, special tokens (pad, bos) skipped."""
    kept = []
    for i in ids:
      i = int(i)
      if i in self._stop_set:
        break
      if i not in self._drop:
        kept.append(i)
    text = self._tok.decode(kept, skip_special_tokens=True)
    # transformers skips this clean-up for BPE models (it would eat real spaces), and so do we.
    if self._clean_up and self._model_type != "BPE":
      for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                   (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text

  def __reduce__(self):
    return (HFTokenizer, self._args)
