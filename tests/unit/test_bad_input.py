"""Bad input, in this process: refused before any work with one line and exit 2, or read as people mean it.
Damaged tars lose only what is damaged; shard folders without their tars or `_info.json` and YAML that does not
parse are refused; numbers read as people write them; cross-field constraints of model and data are config
errors; a newline in a path never reaches a generated sbatch script, and shell syntax in one stays text; study
names of dots and output folders that mutransfer did not write are refused; a user's error is one line while a
bug keeps its traceback. The probes that start processes: tests/integration/test_faults.py and
tests/integration/test_recovery_and_concurrency.py."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from train_helpers import EVAL_PER_SHARD, EVAL_SAMPLES, copy_shards, write_config

from mutransfer.cli import main as cli_main
from mutransfer.data import DataConfig, build_eval_loader
from mutransfer.data.writer import sample_key
from mutransfer.train.__main__ import main as train_main
from mutransfer.train.config import load_config


@pytest.fixture(scope="module")
def shards(shard_set) -> Path:
    return shard_set(512, EVAL_SAMPLES, validation_per_shard=EVAL_PER_SHARD)


def cli(*args: str) -> tuple[int, str, str]:
    """`mutransfer ...` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(args))
    return code, out.getvalue(), err.getvalue()


def fake_slurm_bin(folder: Path) -> Path:
    """srun, scontrol and deepspeed that do nothing: a generated script can run to its end here."""
    folder.mkdir()
    for name in ("srun", "scontrol", "sbatch"):
        (folder / name).write_text("#!/bin/sh\nexit 0\n")
        (folder / name).chmod(0o755)
    return folder


def run_script(script: Path, cwd: Path, fake_bin: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1",
               SLURM_ARRAY_JOB_ID="7", SLURM_ARRAY_TASK_ID="0", SLURM_NODEID="0", SLURM_JOB_NUM_NODES="1")
    return subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


# --- a damaged or truncated tar loses only what is damaged, and says what it lost ----------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_damaged_tars_keep_the_rest_of_the_shard_and_count_the_loss_by_shard(damaged, num_workers) -> None:
    cfg = DataConfig(shards_dir=str(damaged), img_size=32, batch_size=16, num_workers=num_workers)
    loader = build_eval_loader(cfg)
    keys = [key for batch in loader for key, valid in zip(batch.keys, batch.valid) if valid]
    good = loader.good_per_shard()
    assert len(keys) == len(set(keys)) == sum(good)
    assert good[0] == good[3] == EVAL_PER_SHARD  # intact shards
    assert good[1] >= EVAL_PER_SHARD - 3, good  # the 4 KiB cost the samples it covered, not half the shard
    # the samples after the damage were read
    assert sample_key("validation", 2 * EVAL_PER_SHARD - 1) in keys
    # every sample _info.json lists is accounted for: evaluated, or skipped and counted by kind
    skipped = loader.skip_counts
    assert skipped["unread_samples"] >= EVAL_PER_SHARD // 2 - 5  # most of the cut half of shard 2
    assert sum(good) + skipped["unread_samples"] + skipped["missing_field"] + skipped["corrupt_image"] \
        == EVAL_SAMPLES, (good, skipped)


# --- bad shard folders and YAML: exit 2 and one line, before any work ----------------------------------------
@pytest.mark.parametrize("case", ["no_info", "empty", "tars_gone", "yaml_syntax"])
def test_bad_shard_folders_and_yaml_exit_2_with_one_line(case, shards, tmp_path, capsys) -> None:
    folder = tmp_path / "shards"
    if case == "empty":
        folder.mkdir()
    else:
        copy_shards(shards, folder)
    if case == "no_info":
        (folder / "_info.json").unlink()
    if case == "tars_gone":
        for tar in folder.glob("validation-*.tar"):
            tar.unlink()
    config = write_config(tmp_path / "run.yaml", folder, tmp_path / "out", "sqlite:///unused.db")
    if case == "yaml_syntax":
        config.write_text(config.read_text() + "data: [1,\n  broken: {\n")
    assert train_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    expected = {"no_info": "has no _info.json", "empty": "is empty", "tars_gone": "4 of 4 shards missing",
                "yaml_syntax": "not valid YAML at line"}[case]
    assert expected in err[0], err
    assert not (tmp_path / "out").exists()


# --- numbers as people write them ----------------------------------------------------------------------------
def test_numbers_in_files_and_overrides_are_floats(shards, tmp_path) -> None:
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "out", "sqlite:///unused.db")
    text = config.read_text().replace("lr: 0.03", "lr: 3e-3").replace("weight_decay: 0.01", "weight_decay: 1e-05")
    config.write_text(text)
    cfg = load_config(config, ["optim.eps=1e-8", "optim.beta2=.95", "run.steps=7"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.eps, cfg.optim.beta2) == (3e-3, 1e-5, 1e-8, 0.95)
    assert load_config(config, ["optim.lr=3e-3"]).optim.lr == 0.003  # the README's own example
    assert isinstance(cfg.run.steps, int)


# --- cross-field constraints of model and data at config time ------------------------------------------------
def test_an_image_size_the_patches_do_not_tile_is_a_config_error(shards, tmp_path, capsys) -> None:
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "out", f"sqlite:///{tmp_path / 'db'}")
    assert train_main(["--config", str(config), "data.img_size=33"]) == 2
    err = capsys.readouterr().err
    assert "data.img_size: 33 is not divisible by the model's patch_size 8" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_other_model_constraints_are_config_errors_naming_the_model(shards, tmp_path) -> None:
    from mutransfer.errors import ConfigError

    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "out", f"sqlite:///{tmp_path / 'db'}")
    with pytest.raises(ConfigError, match="^data.img_size: 40 is not divisible"):
        load_config(config, ["model.patch_size=16", "data.img_size=40"])
    load_config(config, ["model.patch_size=16", "data.img_size=48"])  # fits


def test_the_model_build_check_is_remembered_per_model_section(shards, tmp_path) -> None:
    """A sweep checks each trial's config several times and a shape's trials share one model section: the
    second config of a shape costs no build, and a model that does not build stays a problem every time."""
    from mutransfer.train.config import model_build_problem

    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "out", f"sqlite:///{tmp_path / 'db'}")
    load_config(config, ["optim.lr=0.001"])
    hits = model_build_problem.cache_info().hits
    load_config(config, ["optim.lr=0.002", "run.seed=3"])
    assert model_build_problem.cache_info().hits > hits
    bad = (("base_width", 0), ("img_size", 32), ("num_classes", 10), ("width", 32))
    assert model_build_problem("vit", bad) == model_build_problem("vit", bad) == (
        "base_width must be a positive integer, got 0")


# --- no shell injection through generated sbatch scripts -----------------------------------------------------
@pytest.mark.parametrize("where", ["launch", "sweep"])
def test_a_newline_in_a_path_is_refused_before_any_script_is_written(where, shards, tmp_path) -> None:
    evil = "runs/x\nid > pwned.txt #"
    config = write_config(tmp_path / "evil.yaml", shards, tmp_path / "unused", f"sqlite:///{tmp_path / 'db'}")
    script = tmp_path / "job.sbatch"
    if where == "launch":
        raw = yaml.safe_load(config.read_text())
        raw["run"]["output_dir"] = evil
        config.write_text(yaml.safe_dump(raw))
        args = ["launch", "--config", str(config), "--slurm", "--num-nodes", "1", "--gpus-per-node", "1"]
    else:
        study = tmp_path / "study.yaml"
        study.write_text(yaml.safe_dump({"study": {"name": "evil", "base_config": str(config), "output_dir": evil},
                                         "shapes": {"widths": [16], "depths": [1]}, "grid": {"lr": [1e-3]}}))
        args = ["sweep", "--config", str(study), "--slurm", "--tracking-uri", "http://127.0.0.1:9"]
    code, _, err = cli(*args, "--script", str(script))
    assert code == 2, err
    assert "output_dir: a path must not contain a newline" in err and len(err.strip().splitlines()) == 1
    assert not script.exists() and not (tmp_path / "pwned.txt").exists()


def test_shell_characters_in_paths_stay_text_when_the_script_runs(shards, tmp_path) -> None:
    """A path full of shell syntax (but one line) is legal: the script quotes it, and running the script
    (with do-nothing srun and scontrol) executes none of it."""
    folder = tmp_path / "runs $(touch pwned1) `touch pwned2`; touch pwned3 #"
    config = write_config(tmp_path / "odd.yaml", shards, folder, f"sqlite:///{tmp_path / 'db'}")
    script = tmp_path / "job.sbatch"
    code, _, err = cli("launch", "--config", str(config), "--slurm", "--num-nodes", "1", "--gpus-per-node", "1",
                       "--script", str(script))
    assert code == 0, err
    done = run_script(script, tmp_path, fake_slurm_bin(tmp_path / "bin"))
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.glob("pwned*")) and not list(Path.cwd().glob("pwned*"))
    assert (folder / "hostfile-7").is_file()  # the script did run, with the path as one word


def test_script_values_with_a_newline_are_refused() -> None:
    from mutransfer.errors import ConfigError
    from mutransfer.launch.slurm import check_script_values

    check_script_values(cwd=Path("/a b/$(c)"), overrides=["x=1"], tracking_uri=None)
    for bad in ({"cwd": Path("/a\nb")}, {"overrides": ["ok=1", "x=1\rid"]}, {"tracking_uri": "http://h\0"}):
        with pytest.raises(ConfigError, match="newline or NUL"):
            check_script_values(**bad)


# --- study names that escape their folder --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..", "."])
def test_a_study_name_of_dots_is_refused(name, shards, tmp_path) -> None:
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "unused", f"sqlite:///{tmp_path / 'db'}")
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"study": {"name": name, "base_config": str(config)},
                                     "shapes": {"widths": [16], "depths": [1]}, "grid": {"lr": [1e-3]}}))
    code, _, err = cli("sweep", "--config", str(study), "--tracking-uri", f"sqlite:///{tmp_path / 'db'}")
    assert code == 2 and "study.name: must be" in err and "not dots alone" in err


# --- run folders with files of another kind ------------------------------------------------------------------
@pytest.mark.parametrize("case", ["user_files", "a_file", "torn_metrics_only"])
def test_an_output_dir_of_another_kind_is_refused_before_anything_is_written(case, shards, tmp_path, capsys) -> None:
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "out", f"sqlite:///{tmp_path / 'db'}")
    out = tmp_path / "out"
    if case == "a_file":
        out.write_text("a file of the user's")
        expected = "is a file, not a folder"
    else:
        out.mkdir()
        (out / "metrics.jsonl").write_text("epoch,loss\n1,0.5\n" if case == "torn_metrics_only" else "")
        if case == "user_files":
            (out / "config.yaml").write_text("learning_rate: 0.1\n")
        expected = "that mutransfer did not write"
    before = {p: p.read_bytes() for p in ([out] if out.is_file() else out.iterdir())}
    assert train_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in ([out] if out.is_file() else out.iterdir())} == before


# --- errors: what a user can fix is one line; a bug keeps its traceback --------------------------------------
def test_a_user_error_is_one_line_with_exit_2_and_a_bug_keeps_its_traceback(monkeypatch, capsys) -> None:
    import sys
    import types

    from mutransfer import cli as top
    from mutransfer.errors import ConfigError, DataError, UsageError

    raised = {"config": ConfigError("optim.lr", "must be positive"), "data": DataError("no shards"),
              "usage": UsageError("--flag is wrong"), "bug": ValueError("an internal invariant broke")}

    def register(subparsers) -> None:
        probe = subparsers.add_parser("probe")
        probe.add_argument("kind")
        probe.set_defaults(func=lambda args: (_ for _ in ()).throw(raised[args.kind]))

    monkeypatch.setitem(sys.modules, "probe_commands", types.SimpleNamespace(register=register))
    monkeypatch.setitem(top.COMMANDS, "probe", ("probe_commands", "a probe"))
    for kind in ("config", "data", "usage"):
        assert top.main(["probe", kind]) == 2
        err = capsys.readouterr().err
        assert err == f"mutransfer probe: error: {raised[kind]}\n"
    with pytest.raises(ValueError, match="an internal invariant broke"):
        top.main(["probe", "bug"])
