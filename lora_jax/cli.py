"""The ``lora-jax`` command line. Results go to stdout; logs and errors go to stderr."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._errors import LoraJaxError
from ._log import log, set_verbose


def _add_model_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", required=True,
                 help="preset name (smollm2-135m, minilm-l6), a .gguf file, an HF model folder, or an HF hub id "
                      "(needs huggingface_hub and network)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                 help="parameter and compute dtype (default: float32)")
  p.add_argument("-q", "--quiet", action="store_true", help="no log lines on stderr")


def _load(args):
  """The model, with the adapter of ``--adapter`` (if any) merged into its weights."""
  from .io import load_model
  model = load_model(args.model, dtype=args.dtype)
  if getattr(args, "adapter", None):
    from .peft import merged_params
    model.params = merged_params(model, args.adapter)
  return model


def _cmd_generate(args) -> None:
  from .generate import SamplingConfig, generate
  sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p)
  model = _load(args)
  results = generate(model, args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                     chat=args.chat, stop=args.stop or (), system=args.system, truncate=args.truncate)
  if args.json:
    for prompt, r in zip(args.prompt, results):
      print(json.dumps({"prompt": prompt, "text": r.text, "tokens": len(r.tokens), "finish_reason": r.finish_reason}))
  else:
    print("\n".join(r.text for r in results))


def _cmd_perplexity(args) -> None:
  from .perplexity import perplexity
  path = Path(args.text_file)
  if not path.is_file():
    raise LoraJaxError(f"{path}: text file not found")
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise LoraJaxError(f"{path}: not UTF-8 text (byte {e.start})") from None
  if not text.strip():
    raise LoraJaxError(f"{path}: the file is empty: nothing to score")
  model = _load(args)
  max_length = args.max_length or min(1024, model.config.max_position_embeddings)
  print(json.dumps(perplexity(model, text, max_length=max_length)))


def _cmd_info(args) -> None:
  from .io import load_model
  model = load_model(args.model, dtype=args.dtype)
  print(json.dumps(model.info(), indent=2))


def _cmd_merge(args) -> None:
  from .io import save_hf_folder
  if args.dtype != "float32":
    raise LoraJaxError("merge writes float32 weights; drop --dtype")
  model = _load(args)
  out = save_hf_folder(args.out, model.params, model.config, model.tokenizer)
  log(f"wrote merged model to {out}")
  print(str(Path(out).absolute()))


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="lora-jax", description=__doc__.splitlines()[0] + " "
                                   "Parameter-efficient fine-tuning of LLMs in JAX.")
  sub = parser.add_subparsers(dest="command", required=True)

  g = sub.add_parser("generate", help="generate a continuation of a prompt (prints only the continuation)")
  _add_model_args(g)
  g.add_argument("--prompt", required=True, action="append",
                 help="prompt text; repeat for a batch (one continuation per line, or JSON lines with --json)")
  g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user turn")
  g.add_argument("--system", default=None, help="system message for --chat")
  g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
  g.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy; > 0 samples")
  g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
  g.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
  g.add_argument("--stop", action="append", help="stop string (repeatable); the output is cut before it")
  g.add_argument("--truncate", action="store_true", help="cut over-long prompts from the left instead of failing")
  g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
  g.add_argument("--adapter", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
  g.set_defaults(func=_cmd_generate)

  p = sub.add_parser("perplexity", help="perplexity of a text file; prints one JSON line")
  _add_model_args(p)
  p.add_argument("--text-file", required=True, help="UTF-8 text file, tokenized whole")
  p.add_argument("--max-length", type=int, default=None,
                 help="window length in tokens; windows do not overlap (default: 1024, or the model context if shorter)")
  p.add_argument("--adapter", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
  p.set_defaults(func=_cmd_perplexity)

  i = sub.add_parser("info", help="architecture, sizes, parameter count and dtype as JSON")
  _add_model_args(i)
  i.set_defaults(func=_cmd_info)

  m = sub.add_parser("merge", help="merge a PEFT adapter into the base; write an HF model folder (prints its path)")
  _add_model_args(m)
  m.add_argument("--adapter", required=True, help="PEFT adapter folder")
  m.add_argument("--out", required=True, help="output folder (config.json, model.safetensors, tokenizer files)")
  m.set_defaults(func=_cmd_merge)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  set_verbose(not getattr(args, "quiet", False))
  try:
    args.func(args)
  except LoraJaxError as e:
    print(f"lora-jax {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"lora-jax {args.command}: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
