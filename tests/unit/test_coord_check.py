"""Coordinate checks that prove the rules, each with a negative control.

Thresholds: over width x8 with Adam, a layer whose update does not shrink with width (SP) moves its output
by ~x8 more (an O(1) per-entry update summed over 8x more inputs); we measured about x7 for sp and x0.95
for mup at these sizes (seeds 0-2). Over depth x16, without a branch multiplier the residual stream adds
L contributions of fixed size, so its size grows like sqrt(16) = x4 or more once trained (measured x7-x11
for mup) while alpha = 1/2 and 1 keep it at ~x1 (measured x0.93-x1.03). A bound of 1.5 on the flat side and
3 on the growing side sits well between them.
"""

from __future__ import annotations

import csv

import pytest

from mutransfer.cli import main
from mutransfer.models.coord_check import last_block_growth, run_coord_check

FLAT, GROWS = 1.5, 3.0
VIT = dict(head_dim=16, img_size=16, patch_size=8, num_classes=10, batch_size=8, progress=False)


def width_change_growth(parametrization: str) -> float:
    records = run_coord_check("vit", parametrization, "width", [32, 256], steps=3, depth=2, base_width=32,
                              base_depth=2, **VIT)
    # step 2: the first step on which hidden weights have moved (zero readout holds them still at step 1)
    return last_block_growth(records, step=2, field="mean_abs_change")


def depth_growth(parametrization: str, model: str = "vit") -> float:
    kwargs = VIT if model == "vit" else dict(img_size=8, num_classes=10, batch_size=8, progress=False)
    records = run_coord_check(model, parametrization, "depth", [2, 32], steps=4, width=64, base_width=64,
                              base_depth=2, **kwargs)
    return last_block_growth(records, step=3)


def test_mup_block_updates_do_not_grow_with_width() -> None:
    assert width_change_growth("mup") < FLAT


def test_sp_block_updates_grow_with_width_negative_control() -> None:
    assert width_change_growth("sp") > GROWS


@pytest.mark.parametrize("parametrization", ["depth_mup", "completep"])
def test_depth_aware_last_block_does_not_grow_with_depth(parametrization: str) -> None:
    assert depth_growth(parametrization) < FLAT


def test_mup_last_block_grows_with_depth_negative_control() -> None:
    assert depth_growth("mup") > GROWS


def test_resmlp_depth_check() -> None:
    assert depth_growth("depth_mup", "resmlp") < FLAT


def test_cli_writes_csv_and_png(tmp_path, capsys) -> None:
    for vary, values in (("width", "32,64"), ("depth", "2,4")):
        code = main(["coord-check", "--model", "vit", "--parametrization", "completep", "--vary", vary,
                     "--values", values, "--steps", "2", "--width", "32", "--depth", "2", "--img-size", "16",
                     "--patch-size", "8", "--head-dim", "16", "--batch-size", "4", "--base-width", "32", "--base-depth", "2",
                     "--out", str(tmp_path)])
        assert code == 0
        csv_path = tmp_path / f"coord_check_vit_completep_{vary}.csv"
        png_path = csv_path.with_suffix(".png")
        assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rows = list(csv.DictReader(open(csv_path)))
        assert set(rows[0]) == {"layer", "step", "size", "mean_abs", "mean_abs_change"}
        assert {int(r["size"]) for r in rows} == {int(v) for v in values.split(",")}
        assert {int(r["step"]) for r in rows} == {0, 1}
        # every layer has a size, but the zero-initialised readout's logits, before the first update
        assert all(float(r["mean_abs"]) > 0 for r in rows if r["layer"] != "logits" or r["step"] != "0")
    assert "wrote" in capsys.readouterr().out


def test_cli_bad_input_exits_2(tmp_path, capsys) -> None:
    code = main(["coord-check", "--parametrization", "nope", "--values", "32,64", "--out", str(tmp_path)])
    assert code == 2
    assert "unknown parametrization 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("adamw", 1e-3)])
def test_first_layer_learning_collapses_with_depth_unless_corrected(optimizer: str, lr: float) -> None:
    """Seed 003: under alpha = 1/2 the own update (W1_t - W1_0) x of fc1 shrinks like 1/sqrt(L), so x1/4
    over depth x16 (measured x0.12-0.13 over x64); an LR factor sqrt(m_L) on fc1 restores it to ~x1."""
    def fc1_growth(exponent: float) -> float:
        records = run_coord_check("resmlp", "depth_mup", "depth", [2, 32], steps=4, optimizer=optimizer, lr=lr,
                                  width=64, base_width=64, base_depth=2, img_size=8, num_classes=10,
                                  batch_size=16, first_layer_lr_exponent=exponent, first_layers=True,
                                  progress=False)
        return last_block_growth(records, step=3, field="mean_abs_change", prefix="first_layer.")

    assert fc1_growth(0.0) < 0.5
    assert 1 / FLAT < fc1_growth(0.5) < FLAT
