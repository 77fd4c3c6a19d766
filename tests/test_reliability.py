"""Fault probes, round two (issue 21): shell injection through generated scripts, damaged or foreign
checkpoints, foreign or torn run files, concurrent sweeps of one study, config checks across sections, and
/dev/shm on one rank. Each probe runs the real thing (shards on disk, real commands and DeepSpeed ranks, real
MLflow stores); README.md's "Reliability" table lists them. Probes that start processes are marked slow."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from train_helpers import write_config

from mutransfer.cli import main as cli_main


def cli(*args: str) -> tuple[int, str, str]:
    """`mutransfer ...` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def shards(shard_set) -> Path:
    return shard_set(256, 64, validation_per_shard=32)


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


# --- 1. no shell injection through generated sbatch scripts ------------------------------------------------------
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


# --- 7. cross-field constraints of model and data at config time ---------------------------------------------
def test_an_image_size_the_patches_do_not_tile_is_a_config_error(shards, tmp_path, capsys) -> None:
    from mutransfer.train.__main__ import main as train_main

    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "out", f"sqlite:///{tmp_path / 'db'}")
    assert train_main(["--config", str(config), "data.img_size=33"]) == 2
    err = capsys.readouterr().err
    assert "data.img_size: 33 is not divisible by the model's patch_size 8" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_other_model_constraints_are_config_errors_naming_the_model(shards, tmp_path) -> None:
    from mutransfer.errors import ConfigError
    from mutransfer.train.config import load_config

    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "out", f"sqlite:///{tmp_path / 'db'}")
    with pytest.raises(ConfigError, match="^data.img_size: 40 is not divisible"):
        load_config(config, ["model.patch_size=16", "data.img_size=40"])
    load_config(config, ["model.patch_size=16", "data.img_size=48"])  # fits


# --- weak: study names that escape their folder -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..", "."])
def test_a_study_name_of_dots_is_refused(name, shards, tmp_path) -> None:
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "unused", f"sqlite:///{tmp_path / 'db'}")
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"study": {"name": name, "base_config": str(config)},
                                     "shapes": {"widths": [16], "depths": [1]}, "grid": {"lr": [1e-3]}}))
    code, _, err = cli("sweep", "--config", str(study), "--tracking-uri", f"sqlite:///{tmp_path / 'db'}")
    assert code == 2 and "study.name: must be" in err and "not dots alone" in err
