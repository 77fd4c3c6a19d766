"""`mutransfer shards write|info`: it works, and bad input exits 2 with a message naming the problem."""

from __future__ import annotations

import io
import tarfile

import pytest
from PIL import Image

from mutransfer.cli import main
from mutransfer.data import read_info


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_write_two_splits_then_info(tmp_path, capsys):
    out = str(tmp_path / "shards")
    code, stdout, _ = run(capsys, "shards", "write", "--source", "synthetic", "--out", out, "--split", "train",
                          "--samples-per-shard", "4", "--samples", "10", "--classes", "3", "--image-size", "16")
    assert code == 0 and "wrote 10 samples of split 'train' into 3 shards" in stdout
    code, _, _ = run(capsys, "shards", "write", "--source", "synthetic", "--out", out, "--split", "validation",
                     "--samples-per-shard", "4", "--samples", "5", "--classes", "3", "--image-size", "16",
                     "--workers", "2")
    assert code == 0
    code, stdout, _ = run(capsys, "shards", "info", out)
    assert code == 0
    assert "train: 10 samples in 3 shards" in stdout and "validation: 5 samples in 2 shards" in stdout


def test_imagefolder_with_resize_and_workers(tmp_path, capsys, image_folder):
    root, pixels = image_folder
    out = tmp_path / "shards"
    code, stdout, _ = run(capsys, "shards", "write", "--source", f"imagefolder:{root}", "--out", str(out),
                          "--split", "train", "--samples-per-shard", "2", "--resize-short", "7", "--workers", "2")
    assert code == 0 and f"wrote {len(pixels)} samples" in stdout
    info = read_info(out)
    with tarfile.open(out / info.split("train").filenames[0]) as tar:
        jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        assert Image.open(io.BytesIO(tar.extractfile(jpg).read())).size == (10, 7)  # 20 x 14 -> short side 7


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--source", "imagefolder:/no/such/folder"], "image folder /no/such/folder does not exist"),
        (["--source", "synthetic"], "--source synthetic needs --samples N"),
        (["--source", "imagefolder:/x", "--classes", "3"], "--classes only apply to --source synthetic"),
        (["--source", "zip:/x"], "unknown source kind 'zip'"),
        (["--source", "synthetic", "--samples", "5", "--classes", "1"], "classes=1 must be between 2"),
        (["--source", "synthetic", "--samples", "5", "--samples-per-shard", "0"], "samples_per_shard=0"),
        (["--source", "synthetic", "--samples", "5", "--split", "a/b"], "split 'a/b' must be"),
        (["--source", "synthetic", "--samples", "5", "--quality", "101"], "quality=101"),
    ],
)
def test_bad_write_arguments_exit_2_naming_the_problem(tmp_path, capsys, argv, message):
    base = {"--out": str(tmp_path / "out"), "--split": "train", "--samples-per-shard": "4"}
    for flag in argv[::2]:
        base.pop(flag, None)
    full = ["shards", "write", *argv, *[x for pair in base.items() for x in pair]]
    code, _, stderr = run(capsys, *full)
    assert code == 2
    assert message in stderr and stderr.startswith("mutransfer shards: error:")


def test_non_empty_folder_and_repeated_split_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["shards", "write", "--source", "synthetic", "--samples", "4", "--out", str(out), "--split", "train",
            "--samples-per-shard", "4"]
    code, _, stderr = run(capsys, *args)
    assert code == 2 and "is not empty (notes.txt" in stderr and "--force" in stderr
    assert run(capsys, *args, "--force")[0] == 0
    code, _, stderr = run(capsys, *args)
    assert code == 2 and "split 'train' already exists" in stderr
    assert (out / "notes.txt").read_text() == "mine"


def test_info_of_a_missing_index_exits_2(tmp_path, capsys):
    code, _, stderr = run(capsys, "shards", "info", str(tmp_path / "nowhere"))
    assert code == 2 and f"no shard index at {tmp_path}/nowhere/_info.json" in stderr
    code, _, stderr = run(capsys, "shards", "info", str(tmp_path))
    assert code == 2 and f"shard folder {tmp_path} is empty: no _info.json and no shards" in stderr


def test_missing_required_option_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["shards", "write", "--source", "synthetic"])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err
