"""What `mutransfer transfer` knows of its target beyond the law: the target's size along every axis, the
fields it must share with its proxies, the documented rules for axes a study did not vary (`--assume`), and
the rules that move weight decay and Adam's beta2 with the target's lr, batch and length.

- Size: width and depth (zoo defaults filled in), the global batch (data.batch_size x optim.accumulation x
  data-parallel ranks) and the length in steps (run.steps, or run.epochs x steps per epoch) and samples.
- Matching: the variant by its resolved values (name, alpha, first-layer exponent), not its spelling;
  then `MATCHED_FIELDS`, each compared with the proxies' logged config, defaults resolved on both sides.
- `ASSUMED`: slopes per doubling, each with its error and source, for a batch or a length the study did not
  vary; `DEFAULT_RULES` names the ones `transfer` applies unless told otherwise.
- Weight decay by its timescale (Wang & Aitchison, arXiv 2405.13698; Bergsma et al., arXiv 2505.13738): AdamW's
  timescale B / (lr x weight_decay x samples), a fraction of the run, is held at the proxy's, so the target's
  weight decay follows its own lr, batch and length. Beta2 by its half-life in samples (Marek et al., arXiv
  2507.07101): beta2_target = beta2_proxy ** (B_target / B_proxy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mutransfer.errors import UsageError
from mutransfer.train.config import RunConfig

from .trial import global_batch, run_steps

MATCHED_FIELDS = ("optim.name", "model.head_dim", "model.patch_size", "model.mlp_ratio", "model.base_width",
                  "model.base_depth", "model.readout_multiplier", "model.zero_init", "model.init_std",
                  "optim.schedule")
"""Config fields proxies and target must share (besides the model family and the parametrization): the lr a
study measures is the lr of this optimizer, schedule and base shape, and means nothing under others."""


def target_sizes(cfg: RunConfig, ranks: int) -> dict[str, float]:
    """{width, depth, batch, steps, samples} of a run config on `ranks` data-parallel ranks."""
    from mutransfer.models.zoo import zoo_entry

    defaults = zoo_entry(cfg.model.name).defaults
    batch, steps = global_batch(cfg, ranks), run_steps(cfg, ranks)
    return {"width": float(cfg.model.width or defaults.get("width")),
            "depth": float(cfg.model.depth or defaults.get("depth")), "batch": float(batch), "steps": float(steps),
            "samples": float(batch * steps)}


def resolved_variant(cfg: RunConfig):
    """The target's variant as its model would resolve it (a `Parametrization`, whose `label` spells it)."""
    from mutransfer.models.parametrization import resolve_parametrization

    return resolve_parametrization(cfg.model.parametrization, alpha=cfg.model.alpha,
                                   first_layer_lr_exponent=cfg.model.first_layer_lr_exponent)


def matching_variant(cfg: RunConfig, variants: set[str]) -> str:
    """The study's variant whose resolved parametrization (name, alpha, first-layer exponent) is the target's:
    `depth_mup+alpha0.5+fle0.5` and `depth_mup+fle0.5` are one. ValueError naming both sides when none is."""
    from mutransfer.models.parametrization import Parametrization, parse_label

    own = resolved_variant(cfg)
    wanted = (own.name, own.alpha, own.first_layer_lr_exponent)
    for variant in sorted(variants):
        fields = parse_label(variant)
        p = Parametrization(fields.pop("parametrization"), **fields)
        if (p.name, p.alpha, p.first_layer_lr_exponent) == wanted:
            return variant
    raise UsageError(f"the target uses {own.label!r} (alpha {own.alpha:g}, first_layer_lr_exponent "
                     f"{own.first_layer_lr_exponent:g}) but the study tuned only {', '.join(sorted(variants))}")


def _effective(key: str, value: Any, model_name: str, parametrization: str) -> str:
    """A field's value with None resolved to the default the model would use, in one spelling."""
    from mutransfer.models.parametrization import DEFAULT_BASE_DEPTH, DEFAULT_BASE_WIDTH, DEFAULT_INIT_STD
    from mutransfer.models.zoo import zoo_entry

    if value in (None, "None", ""):
        field = key.split(".", 1)[1]
        fallback = {"base_width": DEFAULT_BASE_WIDTH, "base_depth": DEFAULT_BASE_DEPTH, "init_std": DEFAULT_INIT_STD,
                    "readout_multiplier": 1.0, "mlp_ratio": 4.0, "zero_init": parametrization != "sp"}
        value = zoo_entry(model_name).defaults.get(field, fallback.get(field))
    try:
        return repr(float(value)) if not isinstance(value, bool) and str(value) not in ("True", "False") else str(value)
    except (TypeError, ValueError):
        return str(value)


def family(model_name: str) -> str:
    """The model family: zoo names built by the same constructor (vit, vit_base_patch16) are one."""
    from mutransfer.models.zoo import zoo_entry

    return getattr(zoo_entry(model_name).builder, "__name__", model_name)


def check_matches(proxy_params: dict[str, str], cfg: RunConfig) -> None:
    """ValueError naming the first field the target does not share with its proxies (as they logged it);
    fields the proxies did not log are not checked."""
    from mutransfer.train.tracking import flatten

    if "model.name" in proxy_params and family(proxy_params["model.name"]) != family(cfg.model.name):
        raise UsageError(f"model.name: the target is a {cfg.model.name!r} ({family(cfg.model.name)}), the proxies "
                         f"a {proxy_params['model.name']!r} ({family(proxy_params['model.name'])}): another family")
    target = flatten(cfg.to_dict())  # as the proxies logged theirs
    name = resolved_variant(cfg).name
    for key in MATCHED_FIELDS:
        if key not in proxy_params:
            continue
        proxy_value = _effective(key, proxy_params[key], proxy_params.get("model.name", cfg.model.name), name)
        target_value = _effective(key, target.get(key), cfg.model.name, name)
        if proxy_value != target_value:
            raise UsageError(f"{key}: the target has {target_value}, its proxies {proxy_value}; the study's lr holds "
                             "only where they match: retune, or set the target's to the proxies'")


@dataclass(frozen=True)
class Assumption:
    """A slope for an axis the study did not vary, its standard error, and where it comes from."""

    axis: str
    slope: float  # log2(lr) per doubling
    source: str
    error: float = 0.0  # standard error of the slope (0: not known, or a rule taken as exact)


ASSUMED: dict[str, dict[str, Assumption]] = {
    "length": {
        "measured": Assumption("length", -0.43, "measured (docs/results.md, 'Batch size and training length'; "
                               "configs/studies/vit_length.yaml): depth_mup+fle0.5 ViT, AdamW, warmup and decay "
                               "to zero, 40 -> 640 steps at batch 32, 3 seeds; the optimum falls with length as "
                               "Bjorck et al., arXiv 2409.19913, found for LLMs", error=0.12),
        "flat": Assumption("length", 0.0, "no correction: the proxies' lr at any length"),
    },
    "batch": {
        "measured": Assumption("batch", 0.48, "measured (docs/results.md, 'Batch size and training length'; "
                               "configs/studies/vit_batch.yaml): depth_mup+fle0.5 ViT, AdamW, batch 16 -> 256 at "
                               "a fixed 10,240 samples, 3 seeds; how far it holds depends on the critical batch "
                               "(Filatov et al., arXiv 2410.05838; Marek et al., arXiv 2507.07101)", error=0.09),
        "sqrt": Assumption("batch", 0.5, "square-root scaling for Adam at a fixed number of samples (Malladi et al., "
                           "arXiv 2205.10287), below the critical batch"),
        "flat": Assumption("batch", 0.0, "no correction: the proxies' lr at any batch"),
    },
}
"""Rules for `--assume AXIS=RULE` (RULE a name here, or a number: the slope per doubling). The batch rules are
at a fixed number of samples: a target whose batch grows at a fixed number of steps also gets the length
rule for its extra samples."""

DEFAULT_RULES = {"length": "measured", "batch": "measured"}
"""What `transfer` applies where the study did not vary an axis: both measured slopes are several standard
errors from zero, with the sign found on real data (issue 18) and in the literature cited, so leaving the lr
as it is would be the rule with the least support (docs/results.md, 'Batch size and training length')."""


def default_assumptions() -> dict[str, Assumption]:
    """The rules `transfer` applies to an axis the study did not vary, unless `--assume` says otherwise."""
    return {axis: ASSUMED[axis][rule] for axis, rule in DEFAULT_RULES.items()}


def parse_assumptions(items: list[str]) -> dict[str, Assumption]:
    """The default rules, with `["length=flat", "batch=0.4"]` replacing them per axis; ValueError naming a
    bad item."""
    out = default_assumptions()
    for item in items:
        axis, _, rule = item.partition("=")
        if axis not in ASSUMED or not rule:
            raise UsageError(f"--assume {item!r}: give length=RULE or batch=RULE")
        if rule in ASSUMED[axis]:
            out[axis] = ASSUMED[axis][rule]
            continue
        try:
            slope = float(rule)
        except ValueError:
            raise UsageError(f"--assume {item!r}: {axis} rules are {', '.join(ASSUMED[axis])} or a slope per "
                             "doubling") from None
        out[axis] = Assumption(axis, slope, f"given on the command line: {slope:+g} log2 per doubling")
    return out


def timescale_weight_decay(proxy_wd: float, proxy_lr: float, proxy_batch: float, proxy_samples: float,
                           lr: float, batch: float, samples: float) -> float:
    """The weight decay that keeps AdamW's timescale B / (lr x wd x samples) at the proxy's."""
    if proxy_wd == 0:
        return 0.0
    timescale = proxy_batch / (proxy_lr * proxy_wd * proxy_samples)
    return batch / (lr * timescale * samples)


def half_life_beta2(proxy_beta2: float, proxy_batch: float, batch: float) -> float:
    """Beta2 whose half-life in samples (B x ln 0.5 / ln beta2) is the proxy's."""
    return proxy_beta2 ** (batch / proxy_batch)


def beta2_half_life_samples(beta2: float, batch: float) -> float:
    return batch * math.log(0.5) / math.log(beta2)
