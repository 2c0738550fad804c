"""The ``lora-jax`` command line. Results go to stdout; logs and errors go to stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ._errors import LoraJaxError
from ._log import log, set_verbose


def _add_quantize_arg(p: argparse.ArgumentParser) -> None:
  p.add_argument("--quantize", default="none", choices=["none", "nf4", "int4", "native"],
                 help="4-bit base weights for the block linears: nf4 (double-quantized, block 64), int4 (symmetric, "
                      "group 64), native (a GGUF file's own Q4_0/Q4_1 blocks, no requantization); default none")
  p.add_argument("--kmajor", action="store_true",
                 help="with --quantize: hold the 4-bit weights in the K-major layout of the GPU kernel that reads "
                      "them as tensor-core register operands (lora_jax.kernels.to_kmajor; its "
                      "Pallas kernel needs a GPU and --dtype bfloat16 or float16: on an H200 it was faster than the "
                      "default layout's kernel at 1-16 rows in every shape timed; "
                      "elsewhere the XLA reference path runs, slower on CPU than the default layout's C++ kernel)")
  p.add_argument("--adapter-merge", default="separate", choices=["separate", "requantized", "dequantized"],
                 help="with --quantize and a LoRA/DoRA/IA3 --adapter: separate (default) keeps the 4-bit base and "
                      "the adapter apart, exactly the model a QLoRA run trains; requantized merges the adapter and "
                      "quantizes the sum again (no adapter term, some drift); dequantized merges into a float copy "
                      "of the 4-bit base (lora_jax.quant.merge_quantized)")


def _add_model_args(p: argparse.ArgumentParser, dtypes=("float32", "bfloat16", "float16")) -> None:
  p.add_argument("--model", required=True,
                 help="a Llama-family decoder: the preset smollm2-135m, a .gguf file, an HF model folder, or an HF "
                      "hub id (needs huggingface_hub and network)")
  p.add_argument("--dtype", default="float32", choices=list(dtypes),
                 help="parameter and compute dtype (default: float32)" if len(dtypes) > 1 else
                      "merge writes float32 weights (the only choice)")
  p.add_argument("-q", "--quiet", action="store_true", help="no log lines on stderr")


def _load(args):
  """The model as ``--model``, ``--quantize`` and ``--kmajor`` say, with the adapter of ``--adapter`` (if any):
  weight methods merged into float weights, or over a 4-bit base as ``--adapter-merge`` says; prompt methods as
  ``model.extras`` (the keyword arguments generate and perplexity take)."""
  model = _load_base(args)
  if getattr(args, "adapter", None):
    from .peft import load_for_inference
    model.params, model.extras = load_for_inference(model, args.adapter,
                                                    quantized_merge=getattr(args, "adapter_merge", "separate"))
  return model


def _load_base(args):
  """The model as ``--model``, ``--quantize`` and ``--kmajor`` say, before any adapter; ``model.extras = {}``."""
  from .io import load_model
  quantize, kmajor = getattr(args, "quantize", "none"), getattr(args, "kmajor", False)
  if kmajor and quantize == "none":
    raise LoraJaxError("--kmajor lays out 4-bit weights for their GPU kernel: it needs --quantize nf4, int4 or "
                       "native")
  if getattr(args, "adapter_merge", "separate") != "separate" and (quantize == "none" or not args.adapter):
    raise LoraJaxError(f"--adapter-merge {args.adapter_merge} says how an --adapter meets a --quantize'd base: it "
                       f"needs both")
  model = load_model(args.model, dtype=args.dtype)
  model.extras = {}
  if quantize != "none":
    from .quant import quantize_model_params
    model.params = quantize_model_params(model.params, quantize, gguf_blocks=model.quantized)
    if kmajor:
      from .kernels import to_kmajor
      model.params = to_kmajor(model.params)
  return model


def _cmd_generate(args) -> None:
  from .generate import SamplingConfig, generate
  sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p)
  model = _load(args).unstack_layers()  # per-layer layout: ~2x faster decoding (see lora_jax.models)
  results = generate(model, args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                     chat=args.chat, stop=args.stop or (), system=args.system, truncate=args.truncate,
                     **model.extras)
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
  max_length = args.max_length if args.max_length is not None else min(1024, model.config.max_position_embeddings)
  print(json.dumps(perplexity(model, text, max_length=max_length, **model.extras)))


def _cmd_info(args) -> None:
  from .io import load_model
  model = load_model(args.model, dtype=args.dtype)
  print(json.dumps(model.info(), indent=2))


def _cmd_merge(args) -> None:
  from .io import save_hf_folder
  out = Path(args.out)
  if out.exists() and not out.is_dir():
    raise LoraJaxError(f"{out}: exists and is not a folder; choose another --out")
  if out.is_dir() and any(out.iterdir()) and not args.overwrite:
    raise LoraJaxError(f"{out}: exists and is not empty; pass --overwrite to replace it, or choose another --out")
  model = _load(args)
  if model.extras:
    raise LoraJaxError(f"{args.adapter}: a prompt-learning adapter changes the inputs, not the weights: nothing to "
                       f"merge (use it with --adapter in generate/perplexity)")
  out = save_hf_folder(args.out, model.params, model.config, model.tokenizer)
  log(f"wrote merged model to {out}")
  print(str(Path(out).absolute()))


def _cmd_train(args) -> None:
  from .config import load_config
  from .runner import train
  cfg = load_config(args.config, args.set or [])
  if cfg.sweep:
    raise LoraJaxError(f"{args.config} has a sweep: block; run it with `lora-jax sweep {args.config}`")
  out = args.out or str(Path("runs") / (cfg.name or Path(args.config).stem))
  summary = train(cfg, out, overwrite=args.overwrite, argv=sys.argv, progress=not args.quiet)
  if args.show:
    print(_side_by_side(Path(out), summary, args.show))
    return
  print(json.dumps({k: summary.get(k) for k in ("name", "status", "steps", "final_train_loss", "eval_loss",
                                                   "exact_match_before", "exact_match", "trainable_params",
                                                   "wall_time_s")}))


def _side_by_side(out: Path, summary: dict, n: int) -> str:
  """Before/after exact match and a few test generations of the base and the fine-tuned model."""
  before = json.loads((out / "eval_before.json").read_text()) if (out / "eval_before.json").exists() else None
  after = json.loads((out / "eval_after.json").read_text()) if (out / "eval_after.json").exists() else None
  pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
  lines = [f"run: {out}", f"adapter: {out / 'adapter'} (HF PEFT format)",
           f"trainable params: {summary.get('trainable_params'):,}   steps: {summary.get('steps')}   "
           f"final train loss: {summary.get('final_train_loss'):.4f}   wall time: {summary.get('wall_time_s'):.0f}s",
           f"exact match on {after['n'] if after else 0} held-out examples: "
           f"base {pct(summary.get('exact_match_before'))} -> fine-tuned {pct(summary.get('exact_match'))}", ""]
  if before and after:
    for b, a in list(zip(before["samples"], after["samples"]))[:n]:
      prompt = a["prompt"].replace("\n", " ")
      lines += [f"prompt:     {prompt[:150]}", f"reference:  {a['reference']}",
                f"base:       {b['prediction'][:150]!r}", f"fine-tuned: {a['prediction']!r}", ""]
  return "\n".join(lines)


def _cmd_sweep(args) -> None:
  from .config import load_config
  from .report import write_report
  from .runner import sweep
  cfg = load_config(args.config, args.set or [])
  out = args.out or str(Path("runs") / (cfg.name or Path(args.config).stem))
  sweep(cfg, out, source=args.config, argv=sys.argv, progress=not args.quiet, overwrite=args.overwrite)
  paths = write_report(out)
  print(Path(paths["results.md"]).read_text())


def _cmd_report(args) -> None:
  from .report import main_report
  main_report(args.dir, args.out)


def _cmd_eval(args) -> None:
  from .data import example_kind, read_examples
  from .evaluate import eval_rows, exact_match, mean_loss
  from .peft import LoraConfig, inference_params, load_adapter
  from .train import make_eval_loss
  examples = read_examples(args.data)
  model = _load_base(args)
  params, extras = model.params, {}
  if args.adapter:  # what generation runs: the adapter merged, apart, or folded in (the files read once)
    lcfg, adapter = load_adapter(args.adapter, model.config, dtype=model.dtype)
    params, extras = inference_params(model, lcfg, adapter, quantized_merge=args.adapter_merge, source=args.adapter)
  if args.adapter and args.adapter_merge == "separate":  # the loss as training computes it: the adapter applied
    loss_params = model.params  # to the (4-bit) base
  else:  # no adapter, or one folded into the 4-bit base (--adapter-merge): the loss of the params generation runs
    lcfg, adapter, loss_params = LoraConfig(targets=("q_proj",)), {}, params
  rows = eval_rows(model, examples, seq_len=args.seq_len, chat=not args.no_chat)
  loss = mean_loss(make_eval_loss(model.config, lcfg), adapter, loss_params, rows)
  result = {"examples": len(examples), "loss": loss}
  if any(example_kind(e) != "text" for e in examples):
    em = exact_match(model, params, examples, max_new_tokens=args.max_new_tokens, chat=not args.no_chat,
                     limit=args.limit, **extras)
    result.update(exact_match=em["exact_match"], exact_match_n=em["n"])
  print(json.dumps(result))


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="lora-jax", description="Parameter-efficient fine-tuning of LLMs in JAX. Results go to stdout; logs, "
                                   "progress and errors go to stderr.")
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
  _add_quantize_arg(g)
  g.set_defaults(func=_cmd_generate)

  p = sub.add_parser("perplexity", help="perplexity of a text file; prints one JSON line")
  _add_model_args(p)
  p.add_argument("--text-file", required=True, help="UTF-8 text file, tokenized whole")
  p.add_argument("--max-length", type=int, default=None,
                 help="window length in tokens; windows do not overlap (default: 1024, or the model context if shorter)")
  p.add_argument("--adapter", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
  _add_quantize_arg(p)
  p.set_defaults(func=_cmd_perplexity)

  i = sub.add_parser("info", help="architecture, sizes, parameter count and dtype as JSON")
  _add_model_args(i)
  i.set_defaults(func=_cmd_info)

  m = sub.add_parser("merge", help="merge a PEFT adapter into the base; write an HF model folder (prints its path)")
  _add_model_args(m, dtypes=("float32",))
  m.add_argument("--adapter", required=True, help="PEFT adapter folder")
  m.add_argument("--out", required=True, help="output folder (config.json, model.safetensors, tokenizer files); "
                                              "an existing non-empty folder is refused unless --overwrite")
  m.add_argument("--overwrite", action="store_true", help="replace an existing --out folder and all it holds")
  m.set_defaults(func=_cmd_merge)
  t = sub.add_parser("train", help="fine-tune from a YAML config (resumes if --out holds this run)")
  t.add_argument("config", help="YAML run config (see experiments/)")
  t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=1e-4")
  t.add_argument("--out", help="run directory (default runs/<name or config stem>)")
  t.add_argument("--overwrite", action="store_true", help="replace an output directory holding a different run")
  t.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines")
  t.add_argument("--show", type=int, default=0, metavar="N",
                 help="print before/after exact match and N side-by-side generations instead of the JSON summary")
  t.set_defaults(func=_cmd_train)

  s = sub.add_parser("sweep", help="run every point of a config's sweep: grid (finished points are skipped), "
                                   "then write the report")
  s.add_argument("config", help="YAML run config with a sweep: block")
  s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
  s.add_argument("--out", help="sweep directory (default runs/<name or config stem>)")
  s.add_argument("--overwrite", action="store_true",
                 help="replace a point's directory that holds a different run (and rerun points that diverged)")
  s.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines")
  s.set_defaults(func=_cmd_sweep)

  r = sub.add_parser("report", help="results.csv, results.md (mean ± std over seeds) and plots for a sweep/run dir")
  r.add_argument("dir", help="directory holding run directories (searched recursively for summary.json)")
  r.add_argument("--out", help="where to write the report (default: DIR)")
  r.set_defaults(func=_cmd_report)

  e = sub.add_parser("eval", help="loss and exact match of a model (+ adapter) on a JSONL file; prints JSON")
  _add_model_args(e)
  e.add_argument("--adapter", help="PEFT adapter folder")
  e.add_argument("--data", required=True, help="JSONL examples (instruction/input/output or messages)")
  e.add_argument("--seq-len", type=int, default=256, help="max tokens per example for the loss (default 256)")
  e.add_argument("--max-new-tokens", type=int, default=48, help="generation budget for exact match (default 48)")
  e.add_argument("--limit", type=int, default=None, help="at most this many examples for exact match")
  e.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the chat template")
  _add_quantize_arg(e)
  e.set_defaults(func=_cmd_eval)
  return parser


def _use_compilation_cache() -> None:
  """Keeps compiled XLA programs under ``$LORA_JAX_CACHE/xla`` (jax's persistent compilation cache, at most 2 GiB,
  least recently used out first), so a repeated command skips its compiles: ``generate`` on SmolLM2 took 12.2 s
  instead of 16.4 the second time. A cache directory set through jax (``JAX_COMPILATION_CACHE_DIR``) is left as
  it is; ``LORA_JAX_XLA_CACHE=0`` turns the cache off; an unwritable directory only turns it off."""
  import jax

  from .io._assets import cache_dir
  if os.environ.get("LORA_JAX_XLA_CACHE") == "0" or jax.config.jax_compilation_cache_dir:
    return
  folder = cache_dir() / "xla"
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError:
    return
  jax.config.update("jax_compilation_cache_dir", str(folder))
  if jax.config.jax_compilation_cache_max_size == -1:
    jax.config.update("jax_compilation_cache_max_size", 2 << 30)


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  set_verbose(not getattr(args, "quiet", False))
  _use_compilation_cache()
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
