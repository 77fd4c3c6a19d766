"""Unit tests of the typed config machinery (`mutransfer.typed_config`) and of the run, data and study
sections built on it: coercion, one validation style (ConfigError naming the dotted key), typed changes with
`with_values`, derived values, and a docstring on every field."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import yaml

from mutransfer.data import DataConfig
from mutransfer.errors import ConfigError
from mutransfer.study import config as study_config
from mutransfer.train import config as run_config
from mutransfer.train.config import OptimSection, RunConfig, RunSection, config_from_dict, load_config
from mutransfer.typed_config import Section, build_section, coerce, load_yaml, with_values

SECTIONS = [run_config.ModelSection, run_config.OptimSection, run_config.DeepSpeedSection, run_config.RunSection,
            run_config.TrackingSection, run_config.RunConfig, DataConfig, study_config.StudySection,
            study_config.ShapeSection, study_config.GridSection, study_config.StudyConfig]


def _field_docstrings(cls: type) -> dict[str, str]:
    """Field name -> the string literal right below it in the class body."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for statement, following in zip(body, body[1:]):
        if isinstance(statement, ast.AnnAssign) and isinstance(following, ast.Expr) \
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
            docs[statement.target.id] = following.value.value
    return docs


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_every_config_field_has_a_docstring(cls: type) -> None:
    documented = _field_docstrings(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not documented.get(f.name, "").strip()]
    assert not missing, f"{cls.__name__}: document {missing} (a string literal below the field)"


def test_the_docstring_check_sees_an_undocumented_field() -> None:
    @dataclass
    class Probe(Section):
        documented: int = 1
        """Here."""
        bare: int = 2

    assert set(_field_docstrings(Probe)) == {"documented"}


@pytest.mark.parametrize("text, value", [("3e-3", 0.003), ("1e-05", 1e-5), (".5", 0.5), ("-2.5E+2", -250.0),
                                         ("3", 3), ("true", True), ("null", None), ("1_000", 1000)])
def test_numbers_read_as_people_write_them(text: str, value: object) -> None:
    loaded = load_yaml(f"x: {text}")["x"]
    assert loaded == value and type(loaded) is type(value)


@pytest.mark.parametrize("value, hint, expected", [
    (3, float, 3.0), ([1, 2], tuple[float, float], (1.0, 2.0)), (None, int | None, None), (4, int | None, 4),
    ("a", str | None, "a"), ([0.5, 1], list[float], [0.5, 1.0]), ({"k": 1}, dict[str, str], {"k": "1"}),
])
def test_coercion_widens_and_converts_where_the_hint_says(value, hint, expected) -> None:
    result = coerce("key", value, hint)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize("value, hint, message", [
    ("3e-3", float, "must be a number"), (True, int, "must be an integer"), (1.5, int, "must be an integer"),
    (1, bool, "must be true or false"), (None, int, "must be an integer"), (None, float | int, "must not be null"),
    ([1], tuple[int, int], "must be a list of 2"), ("x", dict[str, str], "must be a mapping"),
    (True, Literal[0, 1, 2, 3], "must be one of 0, 1, 2, 3"), (2, Literal["off", "model"], "must be one of off, model"),
])
def test_coercion_refuses_wrong_types_naming_the_key(value, hint, message) -> None:
    with pytest.raises(ConfigError, match=f"^a.b: {message}") as raised:
        coerce("a.b", value, hint)
    assert raised.value.key == "a.b"


@pytest.mark.parametrize("raw, key", [
    ({"run": {"steps": 1}, "optim": {"lr": 0.0}}, "optim.lr"),
    ({"run": {"steps": 1}, "optim": {"beta1": 1.0}}, "optim.beta1"),
    ({"run": {"steps": 1}, "optim": {"warmup_steps": 5, "warmup_epochs": 1.0}}, "optim.warmup_epochs"),
    ({"run": {"steps": 1, "epochs": 2}}, "run.steps"),
    ({"run": {}}, "run.steps"),
    ({"run": {"steps": 1}, "deepspeed": {"offload_param": True}}, "deepspeed.offload_param"),
    ({"run": {"steps": 1}, "deepspeed": {"zero_stage": 4}}, "deepspeed.zero_stage"),
    ({"run": {"steps": 1, "compile": "model"}, "deepspeed": {"zero_stage": 3}}, "run.compile"),
    ({"run": {"steps": 1}, "model": {"name": "nope"}}, "model.name"),
    ({"run": {"steps": 1}, "model": {"parametrization": "mup", "alpha": 0.75}}, "model.alpha"),
    ({"run": {"steps": 1}, "model": {"width": 100, "head_dim": 64}}, "model.width"),
    ({"run": {"steps": 1}, "data": {"batch_size": 0}}, "data.batch_size"),
    ({"run": {"steps": 1}, "tracking": {"log_model": False, "registered_model_name": "m"}},
     "tracking.registered_model_name"),
    ({"run": {"steps": 1}, "optim": {"lr_typo": 1.0}}, "optim.lr_typo"),
])
def test_every_section_raises_config_error_with_the_dotted_key(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config_from_dict(raw)
    assert raised.value.key == key and str(raised.value).startswith(f"{key}: ")


def test_study_sections_raise_with_the_dotted_key(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("run: {steps: 1}\n")
    good = {"study": {"name": "s", "base_config": str(base)}, "shapes": {"widths": [64], "depths": [2]},
            "grid": {"lr": [0.01]}}
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(good))
    assert study_config.load_study(study_file).trials()
    for change, key in ((("grid", "momentum", [1.0]), "grid.momentum"), (("study", "steps", 0), "study.steps"),
                        (("shapes", "variants", ["mup+bogus1"]), "shapes.variants"),
                        (("grid", "lr", {"min_log2": 1}), "grid.lr")):
        section, name, value = change
        raw = {**good, section: {**good[section], name: value}}
        with pytest.raises(ConfigError) as raised:
            build_section(study_config.StudyConfig, raw)
        assert raised.value.key == key


def test_study_reads_the_old_name_of_variants(tmp_path: Path) -> None:
    """Studies written before `variants` was named so still load, in the file and on the command line; a key
    under both names is refused rather than one silently winning."""
    base = tmp_path / "base.yaml"
    base.write_text("run: {steps: 1}\n")
    raw = {"study": {"name": "s", "base_config": str(base)}, "grid": {"lr": [0.01]},
           "shapes": {"parametrizations": ["mup", "sp"], "list": [], "widths": [64], "depths": [2]}}
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(raw))
    assert study_config.load_study(study_file).shapes.variants == ["mup", "sp"]
    assert study_config.load_study(study_file, ["shapes.parametrizations=[sp]"]).shapes.variants == ["sp"]
    listed = {**raw, "shapes": {"list": [{"parametrization": "sp", "width": 8, "depth": 2}]}}
    study_file.write_text(yaml.safe_dump(listed))
    assert [s.variant for s in study_config.load_study(study_file).shape_list()] == ["sp"]
    both = {**raw, "shapes": {**raw["shapes"], "variants": ["mup"]}}
    study_file.write_text(yaml.safe_dump(both))
    with pytest.raises(ConfigError) as raised:
        study_config.load_study(study_file)
    assert raised.value.key == "shapes.parametrizations"


def test_with_values_changes_typed_fields_and_checks_them_again() -> None:
    base = RunConfig(run=RunSection(steps=10))
    changed = with_values(base, {"optim.lr": 2 ** -6, "model.depth": 16, "optim.warmup_steps": 3})
    assert (changed.optim.lr, changed.model.depth, changed.optim.warmup_steps) == (2 ** -6, 16, 3)
    assert (base.optim.lr, base.model.depth) == (1e-3, None)  # the original is untouched
    assert isinstance(with_values(base, {"optim.lr": 1}).optim.lr, float)  # ints widen, as from YAML
    for values, key in (({"optim.lr": -1.0}, "optim.lr"), ({"optim.nope": 1}, "optim.nope"),
                        ({"run.compile": "model", "deepspeed.zero_stage": 3}, "run.compile"),
                        ({"data.hflip": 2.0}, "data.hflip")):
        with pytest.raises(ConfigError) as raised:
            with_values(base, values)
        assert raised.value.key == key


def test_a_section_made_in_code_is_checked_too() -> None:
    with pytest.raises(ConfigError, match="^lr: must be a number"):
        OptimSection(lr="3e-3")
    with pytest.raises(ConfigError, match="^hflip: "):
        DataConfig(hflip=-0.1)


def test_the_momentum_a_study_tunes_follows_the_optimizer() -> None:
    assert (OptimSection(name="sgd").momentum_key, OptimSection().momentum_key) == ("momentum", "beta1")
    assert OptimSection(name="sgd", momentum=0.7).momentum_value == 0.7
    assert OptimSection(beta1=0.8).momentum_value == 0.8


def test_epochs_and_warmup_epochs_become_steps_from_the_epoch_length() -> None:
    cfg = config_from_dict({"run": {"epochs": 300}, "optim": {"warmup_epochs": 5}})
    assert cfg.run.total_steps(steps_per_epoch=1251) == 375300
    assert cfg.optim.warmup_steps_for(steps_per_epoch=1251) == 6255
    fixed = config_from_dict({"run": {"steps": 40}, "optim": {"warmup_steps": 4}})
    assert (fixed.run.total_steps(1251), fixed.optim.warmup_steps_for(1251)) == (40, 4)


def test_imagenet_configs_derive_their_warmup_from_epochs() -> None:
    configs = Path(__file__).resolve().parents[2] / "configs"
    for name in ("vit_s16_imagenet_zero1.yaml", "vit_l16_zero3.yaml"):
        cfg = load_config(configs / name, check=False)
        assert cfg.run.epochs and cfg.optim.warmup_epochs and not cfg.optim.warmup_steps, name


def test_overrides_from_the_command_line_are_the_only_text() -> None:
    cfg = load_config(None, ["run.steps=3", "optim.lr=3e-3", "data.scale=[0.5, 1]", "tracking.tags={a: 1}"])
    assert (cfg.optim.lr, cfg.data.scale, cfg.tracking.tags) == (0.003, (0.5, 1.0), {"a": "1"})
    with pytest.raises(ConfigError, match="^optim.lr: "):
        load_config(None, ["run.steps=3", "optim.lr=fast"])



def test_the_base_width_docstring_states_the_default_the_code_uses() -> None:
    from mutransfer.models.parametrization import DEFAULT_BASE_WIDTH
    from mutransfer.train.config import ModelSection

    assert f"default, {DEFAULT_BASE_WIDTH}." in _field_docstrings(ModelSection)["base_width"]
