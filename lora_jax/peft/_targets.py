"""Choosing which weights an adapter touches: HF module names, "all-linear", or regexes over parameter paths.

Parameter paths are our tree paths without the leaf, e.g. ``layers/attn/q_proj`` (layers are stacked, so one
path covers every layer; `layers_to_transform` selects layers).
"""

from __future__ import annotations

import re
from typing import Sequence

from .._errors import LoraJaxError

# HF module name -> our parameter path (the kernel lives at <path>/kernel).
MODULE_PATHS = {
    "q_proj": "layers/attn/q_proj", "k_proj": "layers/attn/k_proj", "v_proj": "layers/attn/v_proj",
    "o_proj": "layers/attn/o_proj", "gate_proj": "layers/mlp/gate_proj", "up_proj": "layers/mlp/up_proj",
    "down_proj": "layers/mlp/down_proj",
}
PATH_MODULES = {v: k for k, v in MODULE_PATHS.items()}
# HF module prefix of each path inside model.layers.N (for PEFT file keys).
HF_PREFIX = {"layers/attn": "self_attn", "layers/mlp": "mlp"}


_PROBE_LAYERS = (0, 1, 2, 9, 10, 31, 99, 100, 12345)  # layer indices a layer-specific regex would tell apart


def resolve_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
  r"""Target spec -> sorted parameter paths. Each entry is a module name, "all-linear", or ``re:<regex>``.

  A string that is not a known name is treated as a regex (as PEFT treats a string ``target_modules``),
  full-matched against our path (``layers/attn/q_proj``), the module name (``q_proj``) and the HF module
  names (``model.layers.N.self_attn.q_proj``). An adapter covers a module in every layer it transforms (one layer
  set, `layers_to_transform`, for all modules), so a regex whose HF-name matches depend on the layer index
  (``model\.layers\.0\.self_attn\.q_proj``) is refused rather than widened to every layer.

  Raises:
    LoraJaxError: an entry matches nothing (the message lists the available names), or only some layers.
  """
  if isinstance(targets, str):
    targets = [targets]
  chosen: set[str] = set()
  for t in targets:
    if t in ("all-linear", "all_linear"):
      chosen.update(MODULE_PATHS.values())
    elif t in MODULE_PATHS:
      chosen.add(MODULE_PATHS[t])
    else:
      pattern = t[3:] if t.startswith("re:") else t
      try:
        rx = re.compile(pattern)
      except re.error as e:
        raise LoraJaxError(f"target {t!r} is not a module name and not a valid regex ({e})") from None
      hits = set()
      for p in MODULE_PATHS.values():
        if rx.fullmatch(p) or rx.fullmatch(PATH_MODULES[p]):
          hits.add(p)
          continue
        per_layer = {bool(rx.fullmatch(hf_module_name(p, i))) for i in _PROBE_LAYERS}
        if per_layer == {True, False}:
          raise LoraJaxError(f"target {t!r} matches {PATH_MODULES[p]} in some layers only; an adapter covers each "
                             f"target in every layer it transforms: name the module and choose the layers with "
                             f"layers_to_transform")
        if per_layer == {True}:
          hits.add(p)
      if not hits:
        raise LoraJaxError(f"target {t!r} matches no weight; available module names: {', '.join(MODULE_PATHS)}, "
                           f"'all-linear'; parameter paths: {', '.join(MODULE_PATHS.values())}")
      chosen.update(hits)
  if not chosen:
    raise LoraJaxError("no target modules given")
  return tuple(sorted(chosen))


def resolve_layers(layers: Sequence[int] | int | None, num_layers: int) -> tuple[int, ...]:
  if layers is None:
    return tuple(range(num_layers))
  if isinstance(layers, int):
    layers = [layers]
  bad = [i for i in layers if not 0 <= i < num_layers]
  if bad:
    raise LoraJaxError(f"layers_to_transform {bad} out of range for a model with {num_layers} layers")
  if not layers:
    raise LoraJaxError("layers_to_transform is empty")
  return tuple(sorted(set(int(i) for i in layers)))


def get_path(tree, path: str):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def set_path(tree: dict, path: str, value) -> dict:
  """A copy of `tree` (dicts copied along the path only) with `value` at `path`."""
  head, _, rest = path.partition("/")
  new = dict(tree)
  new[head] = set_path(tree[head], rest, value) if rest else value
  return new


def hf_module_name(path: str, layer: int) -> str:
  """``layers/attn/q_proj`` -> ``model.layers.<layer>.self_attn.q_proj``."""
  group, name = path.rsplit("/", 1)
  return f"model.layers.{layer}.{HF_PREFIX[group]}.{name}"
