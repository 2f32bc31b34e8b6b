"""HFTokenizer, chat templates and chat prompts against transformers, on a tiny Qwen-like
checkpoint built here: a byte-level BPE with Qwen's pre-tokenizer and special tokens, saved with
transformers' save_pretrained together with the public Qwen2-VL / Qwen2.5-VL chat template."""
import json
import os
import pickle
import sys

import jinja2
import numpy as np
import PIL.Image
import pytest
import tokenizers
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors, trainers
import transformers
from transformers.models.qwen2_5_vl import processing_qwen2_5_vl
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl
from transformers.utils import chat_template_utils

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools"))
import tiny_qwen_vl  # noqa: E402  pylint: disable=g-import-not-at-top

from openvlthinker.fields import FieldError
from openvlthinker.models.hf import chat_template
from openvlthinker.models.hf import image_processor as ip
from openvlthinker.models.hf import tokenizer as hf_tokenizer

# chat_template.json of Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct (the same text),
# kept with the tiny checkpoints the other HF tests write.
QWEN2_VL_TEMPLATE = tiny_qwen_vl.CHAT_TEMPLATE
# The pre-tokenizer regex of Qwen2's tokenizer.json.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]
NON_SPECIAL = ["<think>", "</think>"]  # added but not special, as in Qwen3
CORPUS = ["The quick brown fox jumps over the lazy dog.", "What is shown in the image? Think.",
          "héllo wörld, ça va? 你好世界", "<thinking> reasoning </thinking> <answer> 42 </answer>",
          "x = 3.14159\n\ty += 2  # done\r\n"]
TEXTS = ["", "hello world", "The  quick\n\nbrown\tfox\r\n", "héllo wörld 你好 🙂 Ω≈ç",
         "<|im_start|>user\nhi<|im_end|>\n", "a<think>why</think>b", "<|image_pad|><|image_pad|>x",
         "<thinking>3 + 4</thinking><answer>7</answer>", "   leading and trailing   "]
IMAGE_CFG = {"min_pixels": 3136, "max_pixels": 40000, "patch_size": 14, "merge_size": 2,
             "temporal_patch_size": 2}


def _backend() -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
      vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL])
  return tok


@pytest.fixture(scope="module", params=["TokenizersBackend", "Qwen2Tokenizer"])
def checkpoint(request, tmp_path_factory):
  """A checkpoint directory; with tokenizer_class Qwen2Tokenizer (what Qwen checkpoints declare)
  transformers rebuilds the tokenizer from its own Qwen2 pipeline, not from tokenizer.json."""
  path = tmp_path_factory.mktemp("ckpt")
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=_backend(), eos_token="<|im_end|>", pad_token="<|endoftext|>",
      chat_template=QWEN2_VL_TEMPLATE)
  fast.save_pretrained(path)
  config = json.loads((path / "tokenizer_config.json").read_text())
  config.update(tokenizer_class=request.param, bos_token=None, unk_token=None,
                clean_up_tokenization_spaces=False, split_special_tokens=False)
  (path / "tokenizer_config.json").write_text(json.dumps(config))
  end_of_text = fast.convert_tokens_to_ids("<|endoftext|>")
  (path / "generation_config.json").write_text(json.dumps(
      {"eos_token_id": [fast.convert_tokens_to_ids("<|im_end|>"), end_of_text]}))
  return path


@pytest.fixture(scope="module")
def ours(checkpoint):
  return hf_tokenizer.HFTokenizer.from_dir(checkpoint)


@pytest.fixture(scope="module")
def theirs(checkpoint):
  return transformers.AutoTokenizer.from_pretrained(str(checkpoint))


class _Processor(processing_qwen2_5_vl.Qwen2_5_VLProcessor):
  """Qwen2_5_VLProcessor without a video processor (transformers' video processors need
  torchvision, absent here; images never reach it)."""

  def check_argument_for_proper_class(self, argument_name, argument):
    if argument_name == "video_processor" and argument is None:
      return None
    return super().check_argument_for_proper_class(argument_name, argument)


@pytest.fixture(scope="module")
def processor(theirs):
  image_proc = image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil.from_dict(IMAGE_CFG)
  return _Processor(image_processor=image_proc, tokenizer=theirs, video_processor=None,
                    chat_template=QWEN2_VL_TEMPLATE)


def _ids(theirs, token):
  return theirs.convert_tokens_to_ids(token)


def test_encode_decode_match_transformers(ours, theirs):
  assert ours.vocab_size == len(theirs)
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False), text
    until_stop = ids[:ids.index(ours.eos_id)] if ours.eos_id in ids else ids
    assert ours.decode(ids) == theirs.decode(until_stop, skip_special_tokens=True), text
  assert ours.encode_batch(TEXTS) == [ours.encode(t) for t in TEXTS]
  # Special tokens are skipped, non-special added ones (<think>) kept, unicode round-trips.
  ids = ours.encode("<|vision_start|>é<|image_pad|>ü<|vision_end|><think>ok</think>")
  assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == "éü<think>ok</think>"
  # A lone continuation byte decodes to U+FFFD in both.
  byte_ids = ours.encode("龍")
  assert len(byte_ids) > 1 and ours.decode(byte_ids[:1]) == theirs.decode(byte_ids[:1])


def test_decode_stops_at_the_first_stop_id(ours, theirs):
  im_end, end_of_text = _ids(theirs, "<|im_end|>"), _ids(theirs, "<|endoftext|>")
  head, tail = ours.encode("the answer is 42"), ours.encode(" and more")
  want = theirs.decode(head, skip_special_tokens=True)
  assert ours.decode(head + [im_end] + tail) == want
  assert ours.decode(head + [end_of_text] + tail + [im_end]) == want  # generation_config's eos
  assert ours.decode(np.array(head + [im_end], np.int32)) == want
  assert ours.decode([im_end] + head) == "" and ours.decode([]) == ""


def test_special_ids(ours, theirs):
  assert ours.eos_id == _ids(theirs, "<|im_end|>") == theirs.eos_token_id
  assert ours.stop_ids == (ours.eos_id, _ids(theirs, "<|endoftext|>"))
  assert ours.pad_id == _ids(theirs, "<|endoftext|>") == theirs.pad_token_id
  assert ours.bos_id is None and theirs.bos_token_id is None
  assert ours.image_id == _ids(theirs, "<|image_pad|>")
  assert ours.video_id == _ids(theirs, "<|video_pad|>")
  assert (ours.vision_start_id, ours.vision_end_id) == (_ids(theirs, "<|vision_start|>"),
                                                        _ids(theirs, "<|vision_end|>"))
  assert ours.special_tokens_map == theirs.special_tokens_map


def test_tags(checkpoint, ours, theirs):
  # The project's tags are text here (several BPE pieces): no single id, their encodings instead.
  assert ours.thinking_start_id == ours.answer_end_id == hf_tokenizer.NO_ID
  assert ours.thinking_start_ids == tuple(ours.encode("<thinking>"))
  assert len(ours.answer_start_ids) > 1 and ours.decode(ours.answer_start_ids) == "<answer>"
  # Tags that are tokens of the checkpoint (Qwen3's <think>) get their ids.
  think = hf_tokenizer.HFTokenizer.from_dir(checkpoint, thinking_tags=("<think>", "</think>"))
  assert (think.thinking_start_id, think.thinking_end_id) == (_ids(theirs, "<think>"),
                                                              _ids(theirs, "</think>"))
  assert think.thinking_start_ids == (think.thinking_start_id,)


def test_pickle_round_trip(ours):
  again = pickle.loads(pickle.dumps(ours))
  for text in TEXTS:
    assert again.encode(text) == ours.encode(text)
  assert (again.eos_id, again.stop_ids, again.pad_id, again.image_id, again.thinking_start_ids) == (
      ours.eos_id, ours.stop_ids, ours.pad_id, ours.image_id, ours.thinking_start_ids)


def test_tokenizer_config_fallbacks_and_errors(checkpoint):
  text = (checkpoint / "tokenizer.json").read_text()
  # No config at all: eos is still <|im_end|>, pad <|endoftext|>, and only eos stops.
  bare = hf_tokenizer.HFTokenizer(text)
  assert bare.eos_id == bare.token_to_id("<|im_end|>") and bare.stop_ids == (bare.eos_id,)
  assert bare.pad_id == bare.token_to_id("<|endoftext|>") and bare.bos_id is None
  # special_tokens_map.json fills what the config leaves out (AddedToken dicts too).
  legacy = hf_tokenizer.HFTokenizer(text, {}, {"pad_token": {"content": "<|video_pad|>"}})
  assert legacy.pad_id == legacy.token_to_id("<|video_pad|>")
  # A pad that is not a special token is still dropped by decode.
  think_pad = hf_tokenizer.HFTokenizer(text, {"pad_token": "<think>"})
  assert think_pad.decode([think_pad.pad_id] + think_pad.encode("hi")) == "hi"
  # No special tokens are added even where tokenizer.json's post-processor would add some.
  start = bare.token_to_id("<|im_start|>")
  backend = tokenizers.Tokenizer.from_str(text)
  backend.post_processor = processors.TemplateProcessing(
      single="<|im_start|> $A", special_tokens=[("<|im_start|>", start)])
  assert backend.encode("hi").ids[0] == start  # what the post-processor adds by default
  assert hf_tokenizer.HFTokenizer(backend.to_str()).encode("hi") == bare.encode("hi")
  with pytest.raises(FieldError, match="pad_token"):
    hf_tokenizer.HFTokenizer(text, {"pad_token": "<pad>"})
  with pytest.raises(FieldError, match="eos_token_id"):
    hf_tokenizer.HFTokenizer(text, {}, {}, {"eos_token_id": 10 ** 6})
  with pytest.raises(FieldError, match="tokenizer.json"):
    hf_tokenizer.HFTokenizer.from_dir(checkpoint / "nowhere")


def _messages(num_images, system=None, as_string=False):
  if as_string:
    messages = [{"role": "user", "content": "What is 2 + 2?\nThink."}]
  else:
    content = [{"type": "image", "image": PIL.Image.new("RGB", (4, 4))}] * num_images
    messages = [{"role": "user", "content": content + [{"type": "text", "text": "Describe é."}]}]
  if system:
    messages.insert(0, {"role": "system", "content": system})
  return messages


@pytest.mark.parametrize("messages", [
    _messages(0, as_string=True), _messages(0), _messages(1), _messages(2),
    _messages(1, system="Be brief."),
    _messages(1) + [{"role": "assistant", "content": "A cat.", "tool_calls": None},
                    {"role": "user", "content": [{"type": "text", "text": "And?"}]}],
], ids=["text-only", "text-list", "one-image", "two-images", "system", "multi-turn"])
def test_render_matches_apply_chat_template(ours, theirs, processor, messages):
  for add in (True, False):
    got = chat_template.render(QWEN2_VL_TEMPLATE, messages, add_generation_prompt=add,
                               **ours.special_tokens_map)
    assert got == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
    assert got == processor.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=add)
  numbered = chat_template.render(QWEN2_VL_TEMPLATE, messages, add_vision_id=True)
  assert numbered == theirs.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True, add_vision_id=True)


# Everything transformers adds to jinja, and its whitespace settings.
FEATURES_TEMPLATE = """{% set ns = namespace(n=0) %}
{%- for m in messages %}
  {% if m.role == 'skip' %}{% continue %}{% endif %}
  {% if m.role == 'stop' %}{% break %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {{ m | tojson }}|{{ m.content | tojson(indent=2) }}
{% endfor %}
{% generation %}gen:{{ ns.n }}{% endgeneration %}
{{ dict(a=1) | tojson }} {{ dict.fromkeys(['x'], 0) | tojson }} {{ strftime_now('%Y') }}
{{ tools | tojson }} {{ documents | tojson }}
{{ eos_token }}{% if add_generation_prompt %}<|im_start|>assistant{% endif %}
"""


def test_render_features_match_transformers(ours, theirs):
  messages = [{"role": "user", "content": "<b>é & \"q\"</b>", "name": None},
              {"role": "skip", "content": "x"},
              {"role": "a", "content": "ok", "reasoning": "because"},
              {"role": "user", "content": [{"type": "image", "image": PIL.Image.new("RGB", (2, 2))},
                                           {"type": "text", "text": "x"}]},
              {"role": "stop"}, {"role": "user", "content": "never"}]
  got = chat_template.render(FEATURES_TEMPLATE, messages, **ours.special_tokens_map)
  assert got == theirs.apply_chat_template(messages, chat_template=FEATURES_TEMPLATE,
                                           tokenize=False, add_generation_prompt=True)
  assert "thinking" in got and "reasoning_content" in got  # reasoning aliased as transformers does
  tools = [{"type": "function", "function": {"name": "zoom", "parameters": {"type": "object"}}}]
  assert chat_template.render(FEATURES_TEMPLATE, messages, tools=tools) == (
      theirs.apply_chat_template(messages, chat_template=FEATURES_TEMPLATE, tools=tools,
                                 tokenize=False, add_generation_prompt=True, eos_token=""))
  with pytest.raises(jinja2.TemplateError, match="no system"):
    chat_template.render("{{ raise_exception('no system') }}", messages)
  for bad in ("{% set ns = namespace() %}{% set ns._x = 1 %}", "{% set ns = namespace(_x=1) %}"):
    for render in (lambda: chat_template.render(bad, messages),
                   lambda: chat_template_utils.render_jinja_template([messages], chat_template=bad)):
      with pytest.raises(jinja2.exceptions.SecurityError):
        render()
  with pytest.raises(jinja2.exceptions.SecurityError):
    chat_template.render("{{ messages.__class__ }}{{ ''.__class__.__mro__ }}", messages)


def test_load_template_resolves_as_the_processor(checkpoint, tmp_path):
  assert chat_template.load_template(checkpoint) == QWEN2_VL_TEMPLATE  # chat_template.jinja
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": [{"name": "tool_use", "template": "T"},
                         {"name": "default", "template": "D"}]}))
  assert chat_template.load_template(tmp_path) == "D"
  (tmp_path / "chat_template.jinja").write_text("J")
  assert chat_template.load_template(tmp_path) == "J"
  (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "L"}))
  assert chat_template.load_template(tmp_path) == "L"
  (tmp_path / "processor_config.json").write_text(json.dumps({"chat_template": "P"}))
  assert chat_template.load_template(tmp_path) == "P"
  processor = transformers.ProcessorMixin.get_processor_dict(str(tmp_path))[0]
  assert processor["chat_template"] == "P"
  (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "X"}))
  assert chat_template.load_template(tmp_path) == "L"
  assert transformers.ProcessorMixin.get_processor_dict(str(tmp_path))[0]["chat_template"] == "L"
  (tmp_path / "chat_template.json").unlink()
  assert transformers.ProcessorMixin.get_processor_dict(str(tmp_path))[0]["chat_template"] == "J"
  with pytest.raises(FieldError, match="chat template"):
    chat_template.load_template(tmp_path / "nowhere")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": {"a": "A"}}))
  (tmp_path / "chat_template.jinja").unlink()
  with pytest.raises(FieldError, match="default"):
    chat_template.load_template(tmp_path)


@pytest.mark.parametrize("sizes", [[], [(60, 90)], [(60, 90), (200, 130)], [(10, 12), (500, 300)]],
                         ids=["none", "one", "two", "tiny-and-large"])
def test_encode_chat_matches_the_processor(ours, processor, sizes):
  cfg = ip.ImageProcessorConfig.from_json(IMAGE_CFG)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
  text = "What is in the picture? <thinking>"
  pixels, grids = ip.preprocess(images, cfg) if images else (None, [])
  got = chat_template.encode_chat(ours, QWEN2_VL_TEMPLATE, text, grids, cfg)
  messages = chat_template.user_turn(text, len(images))
  prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  want = processor(text=[prompt], images=[PIL.Image.fromarray(i) for i in images] or None)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, np.asarray(want["input_ids"][0]))
  assert int((got == ours.image_id).sum()) == sum(ip.tokens_per_image(g, cfg) for g in grids)
  if images:
    assert grids == [tuple(g) for g in want["image_grid_thw"].tolist()]
    np.testing.assert_allclose(pixels, want["pixel_values"], atol=1e-5, rtol=0)


def test_encode_chat_passes_the_special_tokens_to_the_template(ours, processor):
  """The processor hands the tokenizer's named special tokens to the template; so do we."""
  template = QWEN2_VL_TEMPLATE + "{{ pad_token }}{{ eos_token }}"
  cfg = ip.ImageProcessorConfig.from_json(IMAGE_CFG)
  got = chat_template.encode_chat(ours, template, "hi", [(1, 4, 6)], cfg)
  prompt = processor.apply_chat_template(chat_template.user_turn("hi", 1), chat_template=template,
                                         tokenize=False, add_generation_prompt=True)
  assert prompt.endswith("<|endoftext|><|im_end|>")
  want = processor(text=[prompt], images=[PIL.Image.new("RGB", (84, 56))])
  np.testing.assert_array_equal(got, np.asarray(want["input_ids"][0]))


def test_encode_chat_rejects_image_tokens_in_the_text(ours):
  cfg = ip.ImageProcessorConfig.from_json(IMAGE_CFG)
  with pytest.raises(FieldError, match="image tokens"):
    chat_template.encode_chat(ours, QWEN2_VL_TEMPLATE, "a <|image_pad|>", [(1, 4, 4)], cfg)
