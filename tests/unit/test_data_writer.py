"""The shard writer: round trip, determinism, the non-empty-folder rule, undecodable images, hf: source."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mutransfer.data import (
    DataConfig,
    HFSource,
    ImageFolderSource,
    build_eval_loader,
    read_info,
    write_shards,
    write_synthetic_shards,
)


def read_raw(out: Path, split: str) -> dict[str, dict]:
    """Every sample of a split as webdataset itself reads it, by key."""
    info = read_info(out)
    urls = [str(out / f) for f in info.splits[split].filenames]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


def test_imagefolder_round_trip_keeps_keys_labels_and_pixels(tmp_path, image_folder):
    root, pixels = image_folder
    out = tmp_path / "shards"
    summary = write_shards(ImageFolderSource(str(root)), str(out), "train", 4, progress=False)
    assert summary.shard_lengths == [4, 2]

    samples = read_raw(out, "train")
    assert len(samples) == len(pixels)
    by_file = {json.loads(s["json"])["filename"]: s for s in samples.values()}
    assert set(by_file) == set(pixels)
    for name, array in pixels.items():
        sample = by_file[name]
        assert int(sample["cls"]) == ["cat", "dog"].index(name.split("/")[0])
        source_bytes = (root / name).read_bytes()
        if name.endswith(".jpg"):
            assert sample["jpg"] == source_bytes  # JPEGs pass through untouched
        else:  # PNG is re-encoded as JPEG: lossy, so compare to the source pixels within JPEG error
            decoded = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.float32)
            assert decoded.shape == array.shape
            assert np.abs(decoded - array).mean() < 4  # JPEG error on a smooth gradient; another image is ~50 off

    # The reader returns exactly the decoded written bytes (crop_pct=1 and image-sized crops are identity).
    cfg = DataConfig(shards_dir=str(out), eval_split="train", img_size=14, crop_pct=1.0, mean=(0, 0, 0),
                     std=(1, 1, 1), batch_size=8, num_workers=0)
    key_to_file = {k: json.loads(s["json"])["filename"] for k, s in samples.items()}
    for batch in build_eval_loader(cfg):
        for image, label, valid, key in zip(batch.images, batch.targets, batch.valid, batch.keys):
            if not valid:
                continue
            written = np.asarray(Image.open(io.BytesIO(samples[key]["jpg"])).convert("RGB"))
            centre = written[:, 3:17]  # 20 x 14 images: the reader resizes the short side (14) then centre-crops
            np.testing.assert_allclose(image.permute(1, 2, 0).numpy() * 255, centre, atol=1e-3)
            assert int(label) == int(samples[key]["cls"])
            assert key_to_file[key].startswith(("cat/", "dog/"))


def test_writer_is_deterministic_and_independent_of_worker_count(tmp_path):
    first = write_synthetic_shards(str(tmp_path / "a"), "train", 5, 30, 16, 3, 7)
    second = write_synthetic_shards(str(tmp_path / "b"), "train", 5, 30, 16, 3, 7, workers=2)
    assert first.filenames == second.filenames and len(first.filenames) == 5
    for name in [*first.filenames, "_info.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    with tarfile.open(tmp_path / "a" / first.filenames[0]) as tar:
        member = tar.getmembers()[0]
        assert (member.mtime, member.uid, member.gid, member.uname) == (0, 0, 0, "mutransfer")
        assert [m.name for m in tar.getmembers()[:3]] == ["train-000000000.cls", "train-000000000.jpg",
                                                         "train-000000000.json"]


def test_info_json_has_timms_layout_and_timm_reads_our_shards(tmp_path):
    from timm.data.readers.reader_wds import ReaderWds

    write_synthetic_shards(str(tmp_path), "train", 3, 11, 16, 0, 4)
    write_synthetic_shards(str(tmp_path), "validation", 3, 5, 16, 0, 4)
    raw = json.loads((tmp_path / "_info.json").read_text())
    train = raw["splits"]["train"]
    assert train["name"] == "train" and train["num_samples"] == 11
    assert train["filenames"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert train["shard_lengths"] == [4, 4, 3]
    assert raw["splits"]["validation"]["shard_lengths"] == [4, 1]

    info = read_info(tmp_path)
    assert info.split("validation").num_samples == 5 and info.split("train").num_classes == 3
    with pytest.raises(ValueError, match="'test' is not in"):
        info.split("test")

    reader = ReaderWds(str(tmp_path), split="validation", is_training=False)
    targets = sorted(target for _, target in reader)
    assert targets == [0, 0, 1, 1, 2]  # labels cycle through the classes


def test_undecodable_images_are_reported_by_path_skipped_and_counted(tmp_path, image_folder, caplog):
    root, pixels = image_folder
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "dog" / "notes.txt").write_text("not an image")
    source = ImageFolderSource(str(root))
    assert source.ignored == ["dog/notes.txt"]
    summary = write_shards(source, str(tmp_path / "out"), "train", 100, progress=False)
    assert summary.num_samples == len(pixels)
    assert [origin for origin, _ in summary.skipped] == [str(root / "dog" / "broken.jpg")]
    assert "skipped undecodable image" in caplog.text and "broken.jpg" in caplog.text
    assert "1 undecodable" in summary.describe()


def test_refuses_a_non_empty_folder_but_accepts_a_second_split(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="precious.txt"):
        write_synthetic_shards(str(out), "train", 3, 10, 16)
    (out / "precious.txt").unlink()

    write_synthetic_shards(str(out), "train", 3, 10, 16, samples_per_shard=4)
    write_synthetic_shards(str(out), "validation", 3, 6, 16, samples_per_shard=4)  # its own shard names: allowed
    assert set(read_info(out).splits) == {"train", "validation"}
    with pytest.raises(FileExistsError, match="split 'train' already exists"):
        write_synthetic_shards(str(out), "train", 3, 10, 16)

    # --force replaces the split, removes its old shards, and keeps the other split and unknown files.
    (out / "precious.txt").write_text("keep me")
    write_synthetic_shards(str(out), "train", 3, 3, 16, samples_per_shard=4, force=True)
    info = read_info(out)
    assert info.split("train").filenames == ["train-000000.tar"]
    assert info.split("validation").num_samples == 6
    assert sorted(p.name for p in out.iterdir()) == [
        "_info.json", "precious.txt", "train-000000.tar", "validation-000000.tar", "validation-000001.tar"
    ]


def test_hf_source_from_save_to_disk_and_parquet(tmp_path, make_gradient):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(1)
    images = [Image.fromarray(make_gradient(rng, 12, 12)) for _ in range(7)]
    labels = [0, 1, 2, 0, 1, 2, 1]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    dataset = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    dataset.save_to_disk(str(tmp_path / "saved"))
    dataset.to_parquet(str(tmp_path / "data.parquet"))

    for location in ("saved", "data.parquet"):
        source = HFSource(str(tmp_path / location))
        try:
            assert (len(source), source.num_classes, source.class_names) == (7, 3, ["a", "b", "c"])
            out = tmp_path / f"out-{location}"
            summary = write_shards(source, str(out), "train", 3, progress=False)
        finally:
            source.close()
        assert summary.shard_lengths == [3, 3, 1]
        samples = read_raw(out, "train")
        got = sorted((json.loads(s["json"])["index"], int(s["cls"])) for s in samples.values())
        assert got == list(enumerate(labels))
        first = next(s for s in samples.values() if json.loads(s["json"])["index"] == 0)
        decoded = np.asarray(Image.open(io.BytesIO(first["jpg"])), dtype=np.float32)
        assert np.abs(decoded - np.asarray(images[0], dtype=np.float32)).mean() < 4  # stored as PNG, re-encoded
        assert read_info(out).split("train").class_names == ["a", "b", "c"]


def test_hf_source_names_missing_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["x", "y"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="no Image column"):
        HFSource(str(tmp_path / "saved"))
