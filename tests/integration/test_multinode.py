"""Beyond one machine: two "nodes" on loopback through DeepSpeed's `--no_ssh` per-node mode (one gloo process
each), preemption of both nodes and resumption, the sbatch scripts, and one sweep trial by index against a
real MLflow server. Every process a test starts leads its own session and is killed by group at the end."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from train_helpers import (
    BIN,
    free_port,
    losses,
    python_command,
    result,
    run,
    run_env,
    run_ranks,
    write_config,
)

from mutransfer.cli import main as cli_main
from mutransfer.data import DataConfig, build_train_loader, write_synthetic_shards
from mutransfer.launch.slurm import array_spec
from mutransfer.study.config import load_study
from mutransfer.study.store import latest_per_key, load_trials
from mutransfer.train.checkpoint import complete_checkpoints, read_state
from mutransfer.train.config import load_config

pytestmark = pytest.mark.slow  # integration: real processes, engines or servers (make test-fast skips)

# 4 train shards of 128 over 2 ranks x 1 loader worker: each rank owns 2 shards, 256 samples = 32 batches of
# 8, so an epoch in exact mode (data.resampled=false) is one pass over every sample.
TRAIN_SAMPLES, EVAL_SAMPLES, BATCH = 512, 200, 8
STEPS_PER_EPOCH = TRAIN_SAMPLES // (BATCH * 2)
EPOCH1_STEPS = 4
STEPS = STEPS_PER_EPOCH + EPOCH1_STEPS  # into the second epoch
LOSS_TOLERANCE = 1e-6  # measured: 0.0; see test_two_nodes_on_loopback_match_one_node


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("multinode")
    shards = root / "shards"
    write_synthetic_shards(str(shards), "train", classes=10, samples=TRAIN_SAMPLES, image_size=32, seed=0,
                           samples_per_shard=128)
    write_synthetic_shards(str(shards), "validation", classes=10, samples=EVAL_SAMPLES, image_size=32, seed=0,
                           samples_per_shard=64)
    hostfile = root / "hostfile"
    # DeepSpeed's --no_ssh mode only reads the hostfile (node order = node rank, slots = processes): the
    # names never need to resolve, the master address is given
    hostfile.write_text("# two nodes on loopback\nnode0 slots=1\nnode1 slots=1\n")
    return {"root": root, "shards": shards, "hostfile": hostfile, "uri": f"sqlite:///{root / 'mlflow.db'}"}


def exact_config(workspace: dict, name: str) -> Path:
    """The run every launch here trains: exact-mode data, sample keys recorded, an eval per epoch."""
    root = workspace["root"]
    return write_config(root / f"{name}.yaml", workspace["shards"], root / name, workspace["uri"],
                        data=dict(batch_size=BATCH, num_workers=1, shuffle_buffer=200, resampled=False),
                        run=dict(steps=STEPS, log_interval=1, eval_interval=STEPS_PER_EPOCH, record_samples=True))


def shard_keys(shards: Path, split: str) -> set[str]:
    """Sample keys as written, read straight from the tar files."""
    keys = set()
    for shard in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            keys.update(name.rsplit(".", 1)[0] for name in tar.getnames())
    return keys


def sample_rows(output_dir: Path, rank: int, split: str = "train") -> list[dict]:
    lines = (output_dir / f"samples_rank{rank}.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["split"] == split]


def cli(*args: str) -> tuple[int, str, str]:
    """`mutransfer ...` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(args))
    return code, out.getvalue(), err.getvalue()


def node_lines(workspace: dict, config: Path, port: int) -> list[str]:
    code, out, err = cli("launch", "--config", str(config), "--hostfile", str(workspace["hostfile"]), "--no-ssh",
                         "--master-addr", "127.0.0.1", "--master-port", str(port), "--print")
    assert code == 0, err
    return [line for line in out.splitlines() if line.startswith("cd ")]


class Nodes:
    """Each node's printed command in its own session, as if on its own machine.

    `wait` waits for the end of each node's output, not just for its first process: the pipe closes only
    when every process holding it (launcher, ranks, loader workers) is gone, and a signalled DeepSpeed
    runner exits at once while its ranks are still writing their checkpoint."""

    def __init__(self, lines: list[str], cwd: Path) -> None:
        self.procs: list[subprocess.Popen] = []
        self.outputs: list[list[bytes]] = []
        self.readers: list[threading.Thread] = []
        for line in lines:
            proc = subprocess.Popen(["bash", "-c", line], cwd=cwd, env=run_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            chunks: list[bytes] = []
            reader = threading.Thread(target=chunks.extend, args=(proc.stdout,), daemon=True)  # lines to EOF
            reader.start()
            self.procs.append(proc)
            self.outputs.append(chunks)
            self.readers.append(reader)

    def signal(self, sig: int) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)

    def wait(self, timeout: float) -> list[int]:
        deadline = time.time() + timeout
        for reader in self.readers:
            reader.join(max(0.0, deadline - time.time()))
            assert not reader.is_alive(), f"the nodes ran past {timeout} s\n" + self.output()
        return [proc.wait(timeout=10) for proc in self.procs]

    def running(self) -> bool:
        return all(proc.poll() is None for proc in self.procs)

    def output(self) -> str:
        return "\n".join(f"--- node {i}\n" + b"".join(chunks).decode(errors="replace")[-2500:]
                         for i, chunks in enumerate(self.outputs))

    def __enter__(self) -> Nodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.signal(signal.SIGKILL)  # whatever is left of both nodes: launchers, ranks, loader workers
        for proc in self.procs:
            proc.wait()


@pytest.fixture(scope="module")
def one_node_run(workspace) -> Path:
    """The reference: one node, two processes, the same config and seed (started as torchrun starts them: the
    launcher under test is the two nodes')."""
    config = exact_config(workspace, "one_node")
    proc = run_ranks(python_command(config), workspace["root"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workspace["root"] / "one_node"


def test_two_nodes_on_loopback_match_one_node(workspace, one_node_run) -> None:
    """Same world size, same rank -> data mapping, same gloo all-reduce: a sum over two ranks is one
    commutative addition, so the two-node run is expected to reproduce the one-node losses bit for bit.
    Measured: max |difference| = 0.0 over all steps; asserted to LOSS_TOLERANCE (1e-6, fp32 noise) so that a
    harmless change of reduction order elsewhere would not fail it, while a wrong rank or data split would."""
    config = exact_config(workspace, "two_nodes")
    lines = node_lines(workspace, config, free_port())
    assert len(lines) == 2 and all("--no_ssh" in line for line in lines)
    assert [shlex.split(line)[shlex.split(line).index("--node_rank") + 1] for line in lines] == ["0", "1"]
    with Nodes(lines, workspace["root"]) as nodes:
        codes = nodes.wait(timeout=400)
        assert codes == [0, 0], nodes.output()
    out = workspace["root"] / "two_nodes"
    res = result(out)
    assert res["status"] == "finished" and res["step"] == STEPS

    reference, two = losses(one_node_run), losses(out)
    assert set(two) == set(reference) == set(range(1, STEPS + 1))
    worst = max(abs(two[s] - reference[s]) for s in reference)
    assert worst <= LOSS_TOLERANCE, worst
    assert res["eval"] == pytest.approx(result(one_node_run)["eval"], abs=LOSS_TOLERANCE)
    for rank in range(2):  # each rank trained on the same samples in the same order as on one node
        assert sample_rows(out, rank) == sample_rows(one_node_run, rank)

    # every eval pass covers each eval sample exactly once across the two nodes
    everything = shard_keys(workspace["shards"], "validation")
    assert len(everything) == EVAL_SAMPLES
    evals = [row for rank in range(2) for row in sample_rows(out, rank, "eval")]
    assert {row["step"] for row in evals} == {STEPS_PER_EPOCH, STEPS}
    for step in (STEPS_PER_EPOCH, STEPS):
        seen = Counter(key for row in evals if row["step"] == step for key in row["keys"])
        assert set(seen) == everything and set(seen.values()) == {1}
    assert res["eval"]["eval/samples"] == EVAL_SAMPLES

    mlrun = MlflowClient(workspace["uri"]).get_run(res["mlflow_run_id"])
    assert mlrun.data.params["world_size"] == "2" and mlrun.data.tags["mutransfer.status"] == "finished"


def test_sigterm_on_both_nodes_then_resume_completes_the_epoch(workspace, one_node_run) -> None:
    """SIGTERM to every process of both nodes mid-epoch: one consistent checkpoint; a relaunch resumes and
    finishes the epoch; in exact mode no sample is trained twice in that epoch and none is missed."""
    config = exact_config(workspace, "preempted")
    out = workspace["root"] / "preempted"
    with Nodes(node_lines(workspace, config, free_port()), workspace["root"]) as nodes:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").exists() or len(losses(out)) < 2:
            assert nodes.running(), nodes.output()
            assert time.time() < deadline, nodes.output()
            time.sleep(0.05)
        nodes.signal(signal.SIGTERM)  # as SLURM does on preemption: every process on every node
        nodes.wait(timeout=120)
        assert "checkpoint saved" in nodes.output(), nodes.output()

    res = result(out)
    assert res["status"] == "preempted"
    saved = complete_checkpoints(out)
    assert len(saved) == 1, saved
    state, _ = read_state(saved[0])
    killed_at = state.step
    assert state.status == "preempted" and killed_at == res["step"]
    assert 0 < killed_at < STEPS_PER_EPOCH, "the kill must land mid-epoch"
    assert (state.epoch, state.batch_in_epoch) == (0, killed_at)
    assert {"rng_rank0.safetensors", "rng_rank1.safetensors"} <= {p.name for p in saved[0].iterdir()}
    for rank in range(2):  # both ranks stopped after the same step
        assert [row["step"] for row in sample_rows(out, rank)] == list(range(1, killed_at + 1))
    before = {rank: len(sample_rows(out, rank)) for rank in range(2)}

    with Nodes(node_lines(workspace, config, free_port()), workspace["root"]) as nodes:
        assert nodes.wait(timeout=400) == [0, 0], nodes.output()
    finished = result(out)
    assert finished["status"] == "finished" and finished["step"] == STEPS
    assert finished["mlflow_run_id"] == res["mlflow_run_id"]  # the same MLflow run goes on

    rows = {rank: sample_rows(out, rank) for rank in range(2)}
    for rank in range(2):
        assert [row["step"] for row in rows[rank]] == list(range(1, STEPS + 1))  # no step twice, none lost
    epoch0 = Counter(key for rank in range(2) for row in rows[rank] if row["epoch"] == 0 for key in row["keys"])
    assert set(epoch0) == shard_keys(workspace["shards"], "train")  # the resumed run completed the epoch
    assert set(epoch0.values()) == {1}  # ... and trained on no sample twice
    first_part = {k for rank in range(2) for row in rows[rank][:before[rank]] for k in row["keys"]}
    resumed_part = {k for rank in range(2) for row in rows[rank][before[rank]:] if row["epoch"] == 0
                    for k in row["keys"]}
    assert first_part and resumed_part and not first_part & resumed_part
    epoch1 = Counter(key for rank in range(2) for row in rows[rank] if row["epoch"] == 1 for key in row["keys"])
    assert sum(epoch1.values()) == EPOCH1_STEPS * 2 * BATCH and set(epoch1.values()) == {1}

    # preempted and resumed, the run retraces the uninterrupted one-node run
    reference, resumed = losses(one_node_run), losses(out)
    assert set(resumed) == set(reference)
    assert max(abs(resumed[s] - reference[s]) for s in reference) <= LOSS_TOLERANCE


def test_exact_mode_epoch_is_one_pass_and_resampled_mode_repeats(workspace) -> None:
    """The loader's promise behind the preemption test, without a launch: in exact mode an epoch that fits in
    one pass trains on every sample once, even with a shuffle buffer larger than a rank's data; resampled
    mode draws shards with replacement, so its epoch repeats some samples and misses others."""
    seen: dict[bool, Counter] = {}
    for resampled in (False, True):
        cfg = DataConfig(shards_dir=str(workspace["shards"]), img_size=32, batch_size=BATCH, num_workers=1,
                         shuffle_buffer=2000, resampled=resampled, interpolation="bilinear")
        seen[resampled] = Counter(key for rank in range(2)
                                  for _, _, keys in build_train_loader(cfg, rank, 2, with_keys=True) for key in keys)
    everything = shard_keys(workspace["shards"], "train")
    assert set(seen[False]) == everything and set(seen[False].values()) == {1}
    assert sum(seen[True].values()) == TRAIN_SAMPLES and max(seen[True].values()) > 1


def test_launch_prints_deepspeed_commands_and_rejects_bad_input(workspace, tmp_path) -> None:
    config = exact_config(workspace, "cli")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("gpu-a slots=8\ngpu-b slots=8\ngpu-c slots=4  # smaller node\n")
    code, out, err = cli("launch", "--config", str(config), "--hostfile", str(hostfile), "--num-nodes", "2",
                         "--gpus-per-node", "8", "--print", "optim.lr=0.001")
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if line.startswith("cd ")]
    argv = shlex.split(line.split(" && ", 1)[1])
    assert argv[0] == str(BIN / "deepspeed")
    flags = dict(zip(argv[1:argv.index("--module")][::2], argv[2:argv.index("--module")][::2]))
    assert flags == {"--hostfile": str(hostfile), "--launcher": "pdsh", "--num_nodes": "2", "--num_gpus": "8",
                     "--master_port": "29500"}
    args = argv[argv.index("--config") + 1:]
    assert args[0] == str(config) and "optim.lr=0.001" in args
    assert f"run.output_dir={workspace['root'] / 'cli'}" in args and f"tracking.uri={workspace['uri']}" in args
    assert load_config(args[0], args[1:]).optim.lr == 0.001  # what every node runs is a valid config

    code, out, _ = cli("launch", "--config", str(config), "--hostfile", str(hostfile), "--no-ssh", "--print")
    lines = [shlex.split(line.split(" && ", 1)[1]) for line in out.splitlines() if line.startswith("cd ")]
    assert code == 0 and len(lines) == 3
    for rank, argv in enumerate(lines):  # master: the first host's name unless --master-addr says otherwise
        assert argv[argv.index("--node_rank") + 1] == str(rank) and argv[argv.index("--master_addr") + 1] == "gpu-a"

    bad_hosts = tmp_path / "bad_hosts"
    cases = [
        (["--hostfile", str(tmp_path / "missing")], "no such file"),
        (["--hostfile", str(hostfile), "--num-nodes", "4"], "lists only 3 host(s)"),
        (["--hostfile", str(hostfile), "--gpus-per-node", "8"], "gpu-c has only 4 slot(s)"),
        (["--hostfile", str(hostfile), "--no-ssh"], "add --node-rank"),
        (["--hostfile", str(hostfile), "--no-ssh", "--node-rank", "3"], "there are 3 nodes"),
        (["--hostfile", str(hostfile), "--launcher", "ssh"], "--launcher must be one of"),
        (["--hostfile", str(hostfile), "optim.lr=fast"], "optim.lr"),
        (["--hostfile", str(bad_hosts)], "line 2"),
        ([], "--hostfile is required"),
    ]
    bad_hosts.write_text("gpu-a slots=8\ngpu-b 8\n")
    for extra, message in cases:
        code, _, err = cli("launch", "--config", str(config), *extra)
        assert code == 2 and message in err, (extra, err)
    bad_hosts.write_text("gpu-a slots=8\ngpu-a slots=8\n")
    code, _, err = cli("launch", "--config", str(config), "--hostfile", str(bad_hosts), "--print")
    assert code == 2 and "listed twice" in err


def test_slurm_training_script(workspace, tmp_path) -> None:
    config = exact_config(workspace, "slurm_run")
    script = tmp_path / "train.sbatch"
    code, out, err = cli("launch", "--config", str(config), "--slurm", "--num-nodes", "4", "--gpus-per-node", "8",
                         "--time", "24:00:00", "--partition", "gpu", "--sbatch=--exclusive", "--script", str(script),
                         "run.resume=never")
    assert code == 0, err
    assert f"sbatch {script}" in out
    text = script.read_text()
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    sbatch = [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH")]
    run_dir = workspace["root"] / "slurm_run"
    assert {"--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--requeue", "--signal=B:TERM@120",
            "--open-mode=append", "--time=24:00:00", "--partition=gpu", "--exclusive",
            f"--output={run_dir}/slurm-%j.out"} <= set(sbatch)
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in text
    assert "trap on_sigterm TERM" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    (srun,) = [line for line in text.splitlines() if line.startswith("srun ")]
    assert "--ntasks-per-node=1" in srun and '--node_rank "$SLURM_NODEID"' in srun and "--no_ssh" in srun
    # the arguments every node's launcher passes on round-trip through bash into a valid config that
    # resumes from a fixed folder whatever the job id or restart count
    train_args = subprocess.run(["bash", "-c", 'eval "$(grep "^TRAIN_ARGS=" "$0")"; printf "%s\\n" "${TRAIN_ARGS[@]}"',
                                 str(script)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert train_args[:2] == ["--module", "mutransfer.train"] and "run.resume=never" not in train_args
    cfg = load_config(train_args[3], train_args[4:])
    assert cfg.run.output_dir == str(run_dir) and cfg.run.resume == "auto"
    assert "SLURM_JOB_ID" not in cfg.run.output_dir and run_dir.is_dir()


def test_sweep_slurm_array_and_one_trial_by_index(workspace, tmp_path) -> None:
    """`sweep --slurm` needs an MLflow server: it creates the study's parent run before any task starts, and
    the array holds the trials (`--stack 1`) or stacks not yet done. A task (`--trial-index I`) runs trial I
    alone under that parent."""
    from mutransfer.study.ui import start_server

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = write_config(tmp_path / "proxy.yaml", workspace["shards"], tmp_path / "unused", uri,
                        model=dict(parametrization="mup", base_width=16, base_depth=1, first_layer_lr_exponent=None),
                        data=dict(batch_size=BATCH), optim=dict(lr=1e-3, warmup_steps=0),
                        run=dict(steps=4, log_interval=2, save_checkpoints=False), deepspeed=dict(zero_stage=0))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "study": {"name": "array", "experiment": "tests", "base_config": str(base),
                  "output_dir": str(tmp_path / "trials"), "steps": 4},
        "shapes": {"variants": ["mup"], "widths": [16], "depths": [1]},
        "grid": {"lr": [1e-3, 1e-2, 1e-1], "momentum": [0.9]},
        "seeds": [0],
    }))
    keys = [trial.key for trial in load_study(study, ["study.steps=3"]).trials()]  # a key names its length
    code, _, err = cli("sweep", "--config", str(study), "--slurm", "--tracking-uri", uri)
    assert code == 2 and "needs an MLflow tracking server" in err
    code, _, err = cli("sweep", "--config", str(study), "--trial-index", "3", "--tracking-uri", uri)
    assert code == 2 and "indices 0-2" in err

    MlflowClient(uri).search_experiments()  # creates the store the server serves
    with start_server(uri) as server:
        script = tmp_path / "sweep.sbatch"
        code, out, err = cli("sweep", "--config", str(study), "--slurm", "--tracking-uri", server.url,
                             "--script", str(script), "--parallel", "2", "--stack", "1", "study.steps=3")
        assert code == 0, err
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        text = script.read_text()
        assert "#SBATCH --array=0-2%2" in text and "#SBATCH --requeue" in text
        (srun,) = [line for line in text.splitlines() if line.startswith("srun ")]
        assert '--trial-index "$SLURM_ARRAY_TASK_ID"' in srun and f"--tracking-uri {server.url}" in srun
        assert srun.endswith("study.steps=3 &")
        client = MlflowClient(server.url)
        parents = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                     filter_string="tags.`mutransfer.role` = 'study'")
        assert len(parents) == 1  # made once, before any task

        # one array task, as its srun line runs it
        task_argv = shlex.split(srun.removeprefix("srun --ntasks=1 ").removesuffix(" &")
                                .replace('"$SLURM_ARRAY_TASK_ID"', "1"))
        assert task_argv[:2] == [str(BIN / "mutransfer"), "sweep"]
        task = run(task_argv, tmp_path)
        assert task.returncode == 0, task.stderr[-3000:]
        assert "ran 1, skipped 0" in task.stdout
        trials = latest_per_key(load_trials(client, "array"))
        assert [(t.key, t.status) for t in trials] == [(keys[1], "finished")]
        tags = client.get_run(trials[0].run_id).data.tags
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id and tags["mutransfer.role"] == "proxy"
        history = client.get_metric_history(trials[0].run_id, "train/loss")
        assert max(m.step for m in history) == 3  # the override study.steps=3 reached the task

        # written again (at the same length: another length is another trial), the array holds what is left
        code, out, err = cli("sweep", "--config", str(study), "--slurm", "--tracking-uri", server.url,
                             "--script", str(script), "--stack", "1", "study.steps=3")
        assert code == 0, err
        assert "#SBATCH --array=0,2\n" in script.read_text() and "2 of 3 trials" in out
        # stacked (the default), a task runs a stack: the study's one shape is one stack, by a rule that reads
        # no memory; with --stack 2, two stacks, the first of which still holds trial 0
        code, out, err = cli("sweep", "--config", str(study), "--slurm", "--tracking-uri", server.url,
                             "--script", str(script), "study.steps=3")
        assert code == 0, err
        assert "#SBATCH --array=0\n" in script.read_text() and "1 of 1 stacks (3 trials)" in out
        assert '--stack-index "$SLURM_ARRAY_TASK_ID" study.steps=3 &' in script.read_text()
        code, out, err = cli("sweep", "--config", str(study), "--slurm", "--tracking-uri", server.url,
                             "--script", str(script), "--stack", "2", "study.steps=3")
        assert code == 0, err
        assert "#SBATCH --array=0-1\n" in script.read_text() and "2 of 2 stacks (3 trials)" in out
        assert '--stack-index "$SLURM_ARRAY_TASK_ID" --stack 2 study.steps=3 &' in script.read_text()


def test_array_spec_collapses_runs() -> None:
    assert array_spec([0, 1, 2, 3, 7, 9, 10, 11]) == "0-3,7,9-11"
    assert array_spec([5], max_running=4) == "5%4"
