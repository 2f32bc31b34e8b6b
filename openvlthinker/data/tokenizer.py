"""Tokenizers: the narrow `Tokenizer` protocol and the SentencePiece model shipped for the suite.

The shipped model (assets/suite_sp.model, rebuilt by `python -m openvlthinker.data.build_tokenizer`)
uses identity normalisation, byte fallback and split digits, so every string round-trips exactly
and digits are one token each. Ids: pad 0, bos 1, eos 2, then `<image>` 3, `<thinking>` 4,
`</thinking>` 5, `<answer>` 6, `</answer>` 7, newline 8, unk 9 (byte fallback leaves it unused).
"""
from collections.abc import Iterable, Sequence
import importlib.resources
import io
from typing import Protocol, runtime_checkable

import sentencepiece as spm

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
IMAGE = "<image>"
THINKING_START, THINKING_END = "<thinking>", "</thinking>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"
# Matched as whole pieces wherever they occur in text; newline is here because SentencePiece
# trains on lines and would otherwise only reach it through byte fallback.
USER_SYMBOLS = (IMAGE, THINKING_START, THINKING_END, ANSWER_START, ANSWER_END, "\n")
# SentencePiece needs an unk piece; it goes after the user symbols so <image> gets id 3.
UNK_ID = EOS_ID + 1 + len(USER_SYMBOLS)
MAX_VOCAB_SIZE = 1024
MODEL_ASSET = "suite_sp.model"


@runtime_checkable
class Tokenizer(Protocol):
  """What the pipelines, sampler and rewards need from a tokenizer (a HF adapter fits this too)."""
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  image_id: int
  thinking_start_id: int
  thinking_end_id: int
  answer_start_id: int
  answer_end_id: int

  # Ids that end a response (the sampler's stop tokens; decode stops at the first); eos first.
  stop_ids: tuple[int, ...]
  # Ids a response must never contain: image (and other vision) placeholders, which the model's
  # forward replaces by image features, so the update would score another token than was drawn.
  placeholder_ids: tuple[int, ...]

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, with no bos/eos added."""

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` up to the first eos; pad and bos ids are ignored."""


class SentencePieceTokenizer:
  """`Tokenizer` over a SentencePiece model with the special ids above.

  Picklable (it carries the serialised model), so grain worker processes can hold one.
  """

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID
    expected = {PAD_ID: self._sp.pad_id(), BOS_ID: self._sp.bos_id(), EOS_ID: self._sp.eos_id()}
    if any(k != v for k, v in expected.items()):
      raise ValueError(f"SentencePiece model: expected pad/bos/eos ids {PAD_ID}/{BOS_ID}/{EOS_ID}, "
                       f"got {self._sp.pad_id()}/{self._sp.bos_id()}/{self._sp.eos_id()}")
    ids = []
    for symbol in USER_SYMBOLS:
      encoded = self._sp.encode(symbol)
      if len(encoded) != 1:
        raise ValueError(f"SentencePiece model: {symbol!r} must be a single piece, "
                         f"got ids {encoded}")
      ids.append(encoded[0])
    (self.image_id, self.thinking_start_id, self.thinking_end_id, self.answer_start_id,
     self.answer_end_id, self.newline_id) = ids
    self.stop_ids, self.placeholder_ids = (EOS_ID,), (self.image_id,)

  @classmethod
  def from_file(cls, path: str) -> "SentencePieceTokenizer":
    with open(path, "rb") as f:
      return cls(f.read())

  @property
  def model_proto(self) -> bytes:
    return self._proto

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts))

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self._sp.decode([i for i in ids if i not in (self.pad_id, self.bos_id)])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def __reduce__(self):
    return (SentencePieceTokenizer, (self._proto,))


def sampler_ids(tokenizer: Tokenizer) -> dict:
  """The sampler's stop, banned and pad ids for `tokenizer` (`SamplerConfig` fields)."""
  return dict(stop_tokens=tuple(tokenizer.stop_ids), banned_tokens=tuple(tokenizer.placeholder_ids),
              pad_id=tokenizer.pad_id)


def default_model_path():
  """The shipped model (a Traversable inside the installed package)."""
  return importlib.resources.files("openvlthinker.data") / "assets" / MODEL_ASSET


def load_tokenizer(path: str | None = None) -> SentencePieceTokenizer:
  """Loads the SentencePiece model at `path`, or the shipped suite model when `path` is None."""
  if path:
    return SentencePieceTokenizer.from_file(path)
  return SentencePieceTokenizer(default_model_path().read_bytes())


def train_sentencepiece(texts: Iterable[str], vocab_size: int = MAX_VOCAB_SIZE) -> bytes:
  """Trains the tokenizer model on `texts` and returns its serialised proto.

  Deterministic for a given sequence of texts: one thread, no sentence sampling or shuffling. Texts
  are split into lines (newline is a user symbol); `vocab_size` is an upper bound (a small corpus
  yields fewer pieces). BPE rather than unigram: on the suite's small templated corpus unigram
  stops at a few hundred pieces and splits common words, BPE fills the vocabulary with them.
  """
  if not 0 < vocab_size <= MAX_VOCAB_SIZE:
    raise ValueError(f"vocab_size: got {vocab_size}, expected 1..{MAX_VOCAB_SIZE}")
  lines = [line for text in texts for line in text.split("\n") if line]
  if not lines:
    raise ValueError("train_sentencepiece: got no non-empty text to train on")
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size,
      model_type="bpe", character_coverage=1.0, byte_fallback=True, split_digits=True,
      normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, hard_vocab_limit=False,
      pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
      user_defined_symbols=list(USER_SYMBOLS),
      num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
      max_sentence_length=1 << 16, minloglevel=2)
  return out.getvalue()
