"""The shipped SentencePiece tokenizer: ids, exact round trips, digits, determinism, pickling."""
import functools
import io
import pickle
import re

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import pytest
import sentencepiece as spm

from openvlthinker import taxonomy
from openvlthinker.data import build_tokenizer
from openvlthinker.data import prompts
from openvlthinker.data import tokenizer as tokenizer_lib
from openvlthinker.tasks import registry

SAMPLES_PER_TASK = 200


_shipped = functools.cache(tokenizer_lib.load_tokenizer)  # hypothesis tests cannot take fixtures


@pytest.fixture(scope="module")
def tok():
  return _shipped()


def test_special_ids(tok):
  assert isinstance(tok, tokenizer_lib.Tokenizer)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size <= 1024
  expected = {"<image>": tok.image_id, "<thinking>": tok.thinking_start_id,
              "</thinking>": tok.thinking_end_id, "<answer>": tok.answer_start_id,
              "</answer>": tok.answer_end_id}
  assert list(expected.values()) == [3, 4, 5, 6, 7]
  for text, i in expected.items():
    assert tok.encode(text) == [i] and tok.id_to_piece(i) == text
  # Tags stay single ids inside running text.
  ids = tok.encode("x<thinking>a b</thinking><answer>7</answer>")
  assert [i for i in ids if i in expected.values()] == [4, 5, 6, 7]


def _suite_texts():
  for task_type in taxonomy.TASK_TYPES:
    for index in range(SAMPLES_PER_TASK):
      split = "eval" if index % 4 == 0 else "train"  # eval text was never in the corpus
      example = registry.generate(task_type, split, index, difficulty=index % 4)
      yield from (example.question, example.answer, example.reasoning, *example.options,
                  prompts.prompt_text(example))


def test_round_trips_all_suite_text(tok):
  texts = list(_suite_texts())
  assert len(texts) > 4 * len(taxonomy.TASK_TYPES) * SAMPLES_PER_TASK
  bad = [t for t, ids in zip(texts, tok.encode_batch(texts)) if tok.decode(ids) != t]
  assert not bad, bad[:3]


def test_digits_are_single_tokens(tok):
  for i in range(tok.vocab_size):
    piece = tok.id_to_piece(i).replace("\u2581", "")
    if re.search(r"\d", piece) and not re.fullmatch(r"<0x[0-9A-F]{2}>", piece):  # byte pieces
      assert len(piece) == 1, (i, piece)
  assert [tok.id_to_piece(i) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80))
def test_round_trips_any_unicode(text):
  tok = _shipped()
  assert tok.decode(tok.encode(text)) == text


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(tokenizer_lib.USER_SYMBOLS + (" ", "  ", "\t")),
                          st.text(max_size=6)), max_size=12))
def test_round_trips_text_mixed_with_tags(parts):
  tok = _shipped()
  text = "".join(parts)
  assert tok.decode(tok.encode(text)) == text


def test_decode_stops_at_eos_and_skips_pad_and_bos(tok):
  a, b = "<thinking>x y</thinking>", "after eos"
  ids = [tok.bos_id] + tok.encode(a) + [tok.pad_id] + [tok.eos_id] + tok.encode(b) + [0, 0]
  assert tok.decode(ids) == a
  assert tok.decode([]) == ""


def test_pickles_with_its_model(tok):
  clone = pickle.loads(pickle.dumps(tok))
  text = "Ü 12 <answer>B</answer>"
  assert clone.encode(text) == tok.encode(text) and clone.vocab_size == tok.vocab_size


def test_training_is_deterministic_and_keeps_the_id_layout():
  corpus = [f"<thinking>item {i} costs {i * 7}</thinking><answer>{i}</answer>" for i in range(50)]
  first = tokenizer_lib.train_sentencepiece(corpus, vocab_size=300)
  assert first == tokenizer_lib.train_sentencepiece(list(corpus), vocab_size=300)
  small = tokenizer_lib.SentencePieceTokenizer(first)
  assert small.vocab_size <= 300 and small.answer_end_id == 7


def test_shipped_model_matches_the_build_script():
  proto = tokenizer_lib.train_sentencepiece(build_tokenizer.suite_texts(per_task=300))
  shipped = tokenizer_lib.default_model_path().read_bytes()
  assert proto == shipped, ("the suite's text changed: rebuild the tokenizer with "
                            "`python -m openvlthinker.data.build_tokenizer`")


def test_rejects_a_model_with_other_special_ids():
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c"] * 20), model_writer=out,
                                 vocab_size=20, hard_vocab_limit=False, minloglevel=2)
  with pytest.raises(ValueError, match="pad/bos/eos"):
    tokenizer_lib.SentencePieceTokenizer(out.getvalue())


def test_vocab_size_bound():
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizer_lib.train_sentencepiece(["a"], vocab_size=2048)
