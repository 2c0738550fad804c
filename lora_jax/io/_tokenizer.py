"""`Tokenizer`: text <-> ids and chat templates, from ``tokenizer.json`` or from GGUF metadata.

Tokenization itself is the `tokenizers` library's; this module only builds the right `tokenizers.Tokenizer`
and renders chat templates with jinja2 the way transformers does (sandboxed, ``trim_blocks``/``lstrip_blocks``).

A GGUF file stores a byte-level BPE vocabulary (``tokenizer.ggml.model == "gpt2"``) as tokens + merges + token
types; the split rules come from ``tokenizer.ggml.pre``, named after llama.cpp's pre-tokenizer types. We map
each named type to the pre-tokenizer of the model's original ``tokenizer.json`` (e.g. SmolLM2: split every digit,
then GPT-2 byte-level splitting), so ids equal those of the original HF tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

from .._errors import LoraJaxError
from .._jsonl import read_json_object, read_text

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool):
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def _split_then_bytes(pattern: str):
  return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"), _byte_level(False)])


# llama.cpp `tokenizer.ggml.pre` name -> pre-tokenizer of the original tokenizer.json.
_GGUF_PRE_TOKENIZERS = {
    "default": lambda: _byte_level(True),
    "gpt-2": lambda: _byte_level(True),
    # StarCoder-style vocabularies (SmolLM/SmolLM2): every digit is its own piece, then GPT-2 splitting.
    **{name: (lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level(True)]))
       for name in ("smollm", "starcoder", "refact", "codeshell")},
    **{name: (lambda: _split_then_bytes(_LLAMA3_SPLIT)) for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe")},
    **{name: (lambda: _split_then_bytes(_QWEN2_SPLIT)) for name in ("qwen2", "deepseek-r1-qwen")},
}


@dataclasses.dataclass
class Tokenizer:
  """A `tokenizers.Tokenizer` plus the model's special tokens and chat template."""

  backend: HFTokenizer
  bos_token: str | None = None
  eos_token: str | None = None
  pad_token: str | None = None
  chat_template: str | None = None

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def token_id(self, token: str | None) -> int | None:
    return None if token is None else self.backend.token_to_id(token)

  @property
  def bos_id(self) -> int | None:
    return self.token_id(self.bos_token)

  @property
  def eos_id(self) -> int | None:
    return self.token_id(self.eos_token)

  @property
  def pad_id(self) -> int | None:
    pad = self.token_id(self.pad_token)
    return pad if pad is not None else self.eos_id

  def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Ids of `text` with the tokenizer's defaults (BOS etc. as its post-processor says)."""
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
    """The chat template rendered to text (jinja2, sandboxed, as transformers renders it)."""
    if not self.chat_template:
      raise LoraJaxError("--chat: this model's tokenizer has no chat template")
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):
      raise LoraJaxError(f"chat template: {message}")

    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
    try:
      template = env.from_string(self.chat_template)
    except jinja2.TemplateError as e:
      raise LoraJaxError(f"chat template does not parse: {e}") from None
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token or "", eos_token=self.eos_token or "")

  def encode_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
    """Ids of the rendered chat; the template writes its own special tokens, so none are added."""
    return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt),
                       add_special_tokens=False)


def _token_text(tok: Any) -> str | None:
  if tok is None or isinstance(tok, str):
    return tok
  if isinstance(tok, dict):
    return tok.get("content")
  raise LoraJaxError(f"tokenizer_config.json: cannot read special token {tok!r}")


def tokenizer_from_folder(folder: Path) -> Tokenizer:
  """From ``tokenizer.json`` (required) and ``tokenizer_config.json`` (special tokens, chat template)."""
  path = folder / "tokenizer.json"
  if not path.is_file():
    raise LoraJaxError(f"{folder}: no tokenizer.json (only fast tokenizers in tokenizer.json format are supported)")
  try:
    backend = HFTokenizer.from_file(str(path))
  except Exception as e:  # tokenizers raises a bare Exception on malformed files
    raise LoraJaxError(f"{path}: cannot be read as a tokenizers file: {e}") from None
  cfg: dict[str, Any] = {}
  cfg_path = folder / "tokenizer_config.json"
  if cfg_path.is_file():
    cfg = read_json_object(cfg_path)
  template = cfg.get("chat_template")
  jinja_path = folder / "chat_template.jinja"
  if template is None and jinja_path.is_file():
    template = read_text(jinja_path)
  if isinstance(template, list):  # named templates: take the default one
    template = next((t["template"] for t in template if t.get("name") == "default"), None)
  return Tokenizer(backend=backend, bos_token=_token_text(cfg.get("bos_token")),
                   eos_token=_token_text(cfg.get("eos_token")), pad_token=_token_text(cfg.get("pad_token")),
                   chat_template=template)


def tokenizer_from_gguf(fields: dict[str, Any], source: str) -> Tokenizer:
  """From GGUF ``tokenizer.*`` metadata (byte-level BPE vocabularies)."""
  kind = fields.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise LoraJaxError(f"{source}: tokenizer.ggml.model={kind!r} is not supported (supported: 'gpt2' byte-level BPE)")
  tokens: list[str] = fields["tokenizer.ggml.tokens"]
  merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
  vocab = {t: i for i, t in enumerate(tokens)}
  backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  pre = fields.get("tokenizer.ggml.pre", "default")
  if pre not in _GGUF_PRE_TOKENIZERS:
    raise LoraJaxError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported; supported: {sorted(_GGUF_PRE_TOKENIZERS)}")
  backend.pre_tokenizer = _GGUF_PRE_TOKENIZERS[pre]()
  backend.decoder = decoders.ByteLevel()
  types = fields.get("tokenizer.ggml.token_type") or []
  control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
  backend.add_special_tokens(control)
  user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
  if user:
    backend.add_tokens(user)

  def special(key):
    i = fields.get(f"tokenizer.ggml.{key}")
    return tokens[i] if i is not None and 0 <= i < len(tokens) else None

  bos = special("bos_token_id")
  if fields.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
  else:
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
  return Tokenizer(backend=backend, bos_token=bos, eos_token=special("eos_token_id"),
                   pad_token=special("padding_token_id"), chat_template=fields.get("tokenizer.chat_template"))
