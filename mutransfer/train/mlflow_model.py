"""The final model of a run as an MLflow model (`mlflow.pytorch`), registered under a name when asked.

Which runs: `tracking.log_model=true`, or by default the target of a study (tag `mutransfer.role=target`) and
any run given `tracking.registered_model_name`. The model is our module in float32 on CPU, saved in MLflow's
default torch format for local stores (`torch.export`, "pt2": a traced graph, so loading it needs neither
mutransfer nor unpickling code), with an input example of shape (2, 3, img, img) whose batch dimension stays
free, and the signature inferred from it:

    model = mlflow.pytorch.load_model("models:/NAME/1")       # or runs:/<run id>/model
    logits = model(images)                                     # images normalised as in training

At ZeRO-3 every rank joins the gather of the partitioned weights; rank 0 alone logs. A failure here is
reported and the run still finishes: tracking never stops training.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mutransfer import tags
from mutransfer.models import create_model

from .config import RunConfig

log = logging.getLogger(__name__)

EXAMPLE_BATCH = 2  # torch.export specialises a batch of 1: two keeps the batch dimension dynamic


def wants_model(cfg: RunConfig) -> bool:
    tracking = cfg.tracking
    if not tracking.enabled:
        return False
    if tracking.log_model is not None:
        return tracking.log_model
    return tracking.tags.get(tags.ROLE) == "target" or bool(tracking.registered_model_name)


def full_weights(engine: Any, zero_stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """The module's whole state dict as float32 CPU tensors on rank 0, None elsewhere. Call on every rank."""
    module = engine.module

    def copy() -> dict[str, torch.Tensor] | None:
        if rank != 0:
            return None
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}

    if zero_stage != 3:
        return copy()
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return copy()


def log_final_model(engine: Any, cfg: RunConfig, tracker: Any, rank: int) -> str | None:
    """Log (and register) the final model when the config asks; returns its model URI on rank 0."""
    if not wants_model(cfg):
        return None
    weights = full_weights(engine, cfg.deepspeed.zero_stage, rank)
    if weights is None or not tracker.active:
        return None
    model = create_model(cfg.model.name, **cfg.model.create_kwargs(cfg.data.img_size, cfg.data.num_classes))
    model.load_state_dict(weights, strict=True)
    try:
        uri = _log(model.eval(), cfg, tracker)
    except Exception as err:  # tracking must never stop training
        log.warning(f"mutransfer: logging the final model to MLflow failed ({type(err).__name__}: {err}); "
                    f"`mutransfer export` still writes it from the checkpoint")
        return None
    name = cfg.tracking.registered_model_name
    log.info(f"mutransfer: logged the final model as {uri}" + (f", registered as {name}" if name else ""))
    return uri


def _log(model: torch.nn.Module, cfg: RunConfig, tracker: Any) -> str:
    import mlflow
    import numpy as np
    from mlflow.models import infer_signature

    size = cfg.data.img_size
    example = np.zeros((EXAMPLE_BATCH, 3, size, size), dtype=np.float32)  # zeros: a small JSON example
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    # The fluent API logs (and registers) through the process-wide URI: ours for this call, then the previous
    # state exactly as it was (unset stays unset). Leaving start_run marks the run FINISHED, as the trainer
    # does right after.
    with _use_tracking_uri(tracker.uri), mlflow.start_run(run_id=tracker.run_id):
        info = mlflow.pytorch.log_model(
            model, name="model", input_example=example, signature=signature,
            registered_model_name=cfg.tracking.registered_model_name,
            # given, not inferred: inference loads the model again in a subprocess
            pip_requirements=mlflow.pytorch.get_default_pip_requirements())
    return info.model_uri
