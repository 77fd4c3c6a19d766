"""`--format timm`: our ViTs, multipliers folded in, load into plain timm (strict) and give the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT
from train_helpers import TINY_MODEL, python_command, result, run_ranks, write_config

from mutransfer.cli import main
from mutransfer.data import write_synthetic_shards
from mutransfer.models import create_model, load_model
from mutransfer.models.timm_export import folded_state_dict, save_timm, timm_model_args, to_timm
from mutransfer.train.export import export

pytestmark = pytest.mark.slow  # integration: real processes, engines or servers (make test-fast skips)

TOLERANCE = 1e-5
PARAMETRIZATIONS = ["sp", "mup", "depth_mup", "completep"]
# (width, depth, head_dim, patch_size, img_size, mlp_ratio): wider and deeper than the base (16, 2), a head
# dim other than the base one (so the muP attention scale differs from timm's), and the base shape itself
SHAPES = [(64, 6, 16, 8, 32, 4.0), (48, 3, 8, 4, 16, 2.0), (16, 2, 16, 8, 32, 4.0)]
DATA_CONFIG = {"input_size": (3, 32, 32), "crop_pct": 0.9, "crop_mode": "center", "interpolation": "bilinear",
               "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}


def trained_looking(parametrization: str, shape: tuple, **extra) -> torch.nn.Module:
    """A model whose every weight is non-zero (zero-initialised query and readout would hide a wrong fold)."""
    width, depth, head_dim, patch, img, mlp_ratio = shape
    model = create_model("vit", width=width, depth=depth, head_dim=head_dim, patch_size=patch, img_size=img,
                         mlp_ratio=mlp_ratio, num_classes=7, parametrization=parametrization, base_width=16,
                         base_depth=2, **extra)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


def max_logit_difference(ours: torch.nn.Module, theirs: torch.nn.Module, img_size: int) -> float:
    images = torch.randn(4, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (ours(images) - theirs.eval()(images)).abs().max().item()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "w{}_d{}_h{}_p{}_i{}_r{}".format(*s))
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_folded_weights_give_timm_the_same_logits(parametrization, shape, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may come from the network
    model = trained_looking(parametrization, shape, first_layer_lr_exponent=0.5)  # an LR-only knob
    img_size = shape[4]

    plain = TimmViT(**timm_model_args(model))
    plain.load_state_dict(folded_state_dict(model), strict=True)
    assert max_logit_difference(model, plain, img_size) < TOLERANCE

    folder = save_timm(model, tmp_path / "timm", dict(DATA_CONFIG, input_size=(3, img_size, img_size)),
                       {"model": "vit"})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert type(loaded) is TimmViT
    assert max_logit_difference(model, loaded, img_size) < TOLERANCE
    data = timm.data.resolve_data_config({}, model=loaded)
    assert tuple(data["mean"]) == DATA_CONFIG["mean"] and data["crop_pct"] == 0.9
    assert data["input_size"] == (3, img_size, img_size) and data["interpolation"] == "bilinear"

    # the other documented way: a timm architecture, its dims, and the weights file as the pretrained source
    config = json.loads((folder / "config.json").read_text())
    overlay = timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                                pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"),
                                                            num_classes=model.num_classes))
    assert max_logit_difference(model, overlay, img_size) < TOLERANCE


@pytest.mark.parametrize("parametrization", ["mup", "depth_mup", "completep"])
def test_unfolded_weights_would_not_match(parametrization) -> None:
    """The comparison above can fail: the raw weights in timm give other logits wherever a multiplier is not 1."""
    model = trained_looking(parametrization, SHAPES[0])
    plain = TimmViT(**timm_model_args(model))
    plain.load_state_dict(model.state_dict(), strict=True)
    assert max_logit_difference(model, plain, SHAPES[0][4]) > 1e-3


def test_standard_shape_keeps_its_timm_name() -> None:
    model = create_model("vit_small_patch16", parametrization="mup", base_width=128, base_depth=4, num_classes=10)
    assert to_timm(model).pretrained_cfg["architecture"] == "vit_small_patch16_224"


def test_only_vits_export_to_timm() -> None:
    with pytest.raises(ValueError, match="only the ViT models export to timm, not ResidualMLP"):
        folded_state_dict(create_model("resmlp"))


def test_zero3_checkpoint_exports_to_timm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = tmp_path / "shards"
    write_synthetic_shards(str(shards), "train", classes=10, samples=256, image_size=32, seed=0,
                           samples_per_shard=64)
    write_synthetic_shards(str(shards), "validation", classes=10, samples=32, image_size=32, seed=0,
                           samples_per_shard=32)
    out = tmp_path / "zero3"
    # TINY_MODEL: depth_mup at 2x base width and depth, so every multiplier differs from 1
    config = write_config(tmp_path / "run.yaml", shards, out, f"sqlite:///{tmp_path / 'mlflow.db'}",
                          deepspeed=dict(zero_stage=3), run=dict(steps=4, log_interval=2),
                          tracking=dict(enabled=False))
    proc = run_ranks(python_command(config), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result(out)["status"] == "finished"
    assert not (tmp_path / "mlflow.db").exists()  # tracking off: no rank opens the store (they raced to create it)

    assert main(["export", str(out), str(tmp_path / "ours.safetensors")]) == 0
    assert main(["export", str(out), str(tmp_path / "timm"), "--format", "timm"]) == 0
    assert f"wrote {tmp_path / 'timm'}" in capsys.readouterr().out
    ours = load_model(str(tmp_path / "ours.safetensors")).eval()
    assert ours.parametrization.name == TINY_MODEL["parametrization"]
    theirs = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    assert max_logit_difference(ours, theirs, 32) < TOLERANCE
    provenance = json.loads((tmp_path / "timm" / "config.json").read_text())["mutransfer"]
    assert provenance["step"] == 4 and provenance["kwargs"]["parametrization"] == "depth_mup"

    (tmp_path / "a_file").write_text("")
    assert main(["export", str(out), str(tmp_path / "a_file"), "--format", "timm"]) == 2
    assert "a_file is a file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        export(out, tmp_path / "x", format="onnx")
