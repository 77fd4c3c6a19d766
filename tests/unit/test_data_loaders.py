"""The train and eval loaders over real shards written by our writer."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from mutransfer.data import DataConfig, build_eval_loader, build_train_loader, read_info, train_loss
from mutransfer.data.collate import PAD_TARGET, MixCollate
from mutransfer.data.partition import assign_shards, assigned_samples
from mutransfer.data.writer import sample_key
from mutransfer.errors import ConfigError
from mutransfer.train.config import RunConfig
from mutransfer.typed_config import build_section

# The small_shards fixture (conftest.py): images of 16 px, 4 classes, 50 train and 23 validation samples.
SIZE, CLASSES, TRAIN, EVAL, EVAL_PER_SHARD = 16, 4, 50, 23, 5
EVAL_KEYS = sorted(sample_key("validation", i) for i in range(EVAL))


def config(shards: Path, **overrides) -> DataConfig:
    values = dict(shards_dir=str(shards), img_size=SIZE, batch_size=4, num_workers=0, shuffle_buffer=8)
    return DataConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def small(small_shards) -> Path:
    assert (small_shards.size, small_shards.classes, small_shards.train_samples, small_shards.eval_samples,
            small_shards.eval_per_shard) == (SIZE, CLASSES, TRAIN, EVAL, EVAL_PER_SHARD)
    return small_shards.path


def eval_keys(loader) -> tuple[list[str], int]:
    keys, batches = [], 0
    for batch in loader:
        batches += 1
        assert batch.images.shape == (loader.batch_size, 3, SIZE, SIZE)
        assert torch.equal(batch.valid, batch.targets != PAD_TARGET)
        keys += [key for key, valid in zip(batch.keys, batch.valid) if valid]
    return keys, batches


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_reads_every_sample_exactly_once_with_equal_batch_counts(small, world_size, num_workers):
    cfg = config(small, num_workers=num_workers)
    seen: list[str] = []
    for rank in range(world_size):
        loader = build_eval_loader(cfg, rank, world_size)
        keys, batches = eval_keys(loader)
        assert batches == len(loader)  # the same on every rank: ZeRO-3 ranks step together
        assert sum(loader.good_per_shard()) == len(keys)  # counted by the workers in shared memory, read here
        seen += keys
    assert sorted(seen) == EVAL_KEYS


@pytest.mark.parametrize("shards, workers", [(7, 3), (5, 2), (2, 6), (1, 4), (3, 7)])
def test_shard_assignment_partitions_samples(shards, workers):
    lengths = [5 + (s % 3) for s in range(shards)]
    urls = [f"s{s}" for s in range(shards)]
    taken = []
    for worker in range(workers):
        part = assign_shards(urls, worker, workers)
        samples = [(u, i) for u in part.urls for i in range(lengths[urls.index(u)])]
        stream = [(u, i) for u in urls for i in range(lengths[urls.index(u)])] if part.stride > 1 else samples
        mine = [s for n, s in enumerate(stream) if n % part.stride == part.offset]
        assert len(mine) == assigned_samples(lengths, worker, workers)
        taken += mine
    assert sorted(taken) == sorted((u, i) for u in urls for i in range(lengths[urls.index(u)]))


@pytest.mark.parametrize("resampled", [True, False])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_gives_every_rank_the_same_batch_count(small, resampled, num_workers):
    # 5 shards of 12, 12, 12, 12, 2 samples over 3 ranks: ranks own unequal amounts of data.
    cfg = config(small, num_workers=num_workers, resampled=resampled)
    counts = []
    for rank in range(3):
        loader = build_train_loader(cfg, rank, 3)
        assert len(loader) == TRAIN // (4 * 3)
        for _ in range(2):  # two epochs
            batches = list(loader)
            counts.append(len(batches))
            images, targets = batches[-1]
            assert images.shape == (4, 3, SIZE, SIZE) and targets.dtype == torch.int64
            assert 0 <= int(targets.min()) and int(targets.max()) < CLASSES
    assert counts == [TRAIN // 12] * 6


def test_explicit_batches_per_epoch_beyond_the_data(small):
    cfg = config(small, resampled=False, batches_per_epoch=9, num_workers=2)
    assert [len(list(build_train_loader(cfg, rank, 2))) for rank in range(2)] == [9, 9]


def train_epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader)


def test_train_is_reproducible_per_seed_and_differs_per_epoch(small):
    cfg = config(small, num_workers=1, batches_per_epoch=3)
    first, again = build_train_loader(cfg), build_train_loader(cfg)
    epoch0, epoch1 = train_epoch(first), train_epoch(first)
    assert first.epoch == 2
    same = train_epoch(again)
    for (a, la), (b, lb) in zip(epoch0, same):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(epoch0, epoch1))
    again.set_epoch(1)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(epoch1, train_epoch(again)))
    other_seed = build_train_loader(config(small, num_workers=1, batches_per_epoch=3, seed=1))
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(epoch0, train_epoch(other_seed)))


def test_mixup_gives_soft_targets_that_train_loss_accepts(small):
    cfg = config(small, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, batches_per_epoch=2)
    loader = build_train_loader(cfg)
    assert isinstance(loader.decoder.collate, MixCollate)
    images, targets = next(iter(loader))
    assert targets.shape == (4, CLASSES) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert float(targets.min()) >= 0.1 / CLASSES - 1e-6  # smoothing keeps every class above zero
    loss = train_loss(cfg)(torch.zeros(4, CLASSES), targets)
    torch.testing.assert_close(loss, torch.log(torch.tensor(float(CLASSES))))  # uniform logits


def overwrite_member(shard: Path, name: str, data: bytes) -> None:
    """Overwrite the start of a tar member's bytes in place (the tar headers stay valid)."""
    with tarfile.open(shard) as tar:
        offset = tar.getmember(name).offset_data
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.fixture
def damaged_shards(small, tmp_path) -> Path:
    """The small validation split with a corrupt JPEG (sample 1), a bad label (sample 7) and a truncated
    shard (samples 15..19, cut in its middle)."""
    out = tmp_path / "damaged"
    shutil.copytree(small, out)
    overwrite_member(out / "validation-000000.tar", f"{sample_key('validation', 1)}.jpg", b"\0" * 16)
    overwrite_member(out / "validation-000001.tar", f"{sample_key('validation', 7)}.cls", b"x")
    truncated = out / "validation-000003.tar"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_samples_and_truncated_tar_are_skipped_and_counted(damaged_shards, num_workers, caplog):
    cfg = config(damaged_shards, num_workers=num_workers)
    loader = build_eval_loader(cfg)
    keys, _ = eval_keys(loader)
    counts = loader.skip_counts  # summed from the worker processes' shared counters
    assert (counts["corrupt_image"], counts["bad_label"], counts["bad_shard"]) == (1, 1, 1)
    assert len(keys) == len(set(keys))
    intact = [k for k in EVAL_KEYS if not 15 <= int(k.split("-")[1]) <= 19]
    assert sorted(k for k in keys if k in intact) == sorted(set(intact) - {sample_key("validation", i) for i in (1, 7)})
    from_truncated = sorted(set(keys) - set(intact))
    assert from_truncated == [sample_key("validation", i) for i in range(15, 15 + len(from_truncated))]
    assert len(from_truncated) < 5
    if num_workers == 0:  # (worker processes log to their own stderr, out of caplog's reach)
        assert "validation-000003.tar" in caplog.text and sample_key("validation", 1) in caplog.text

    # Training over the same shards runs its full epoch and counts what it skipped.
    train = build_train_loader(config(damaged_shards, num_workers=num_workers, train_split="validation",
                                      batches_per_epoch=12))
    assert len(list(train)) == 12
    assert train.skip_counts["corrupt_image"] >= 1 and train.skip_counts["bad_shard"] >= 1


def test_missing_shard_sets_fail_at_once_naming_the_pattern(small, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_train_loader(config(tmp_path / "nowhere"))
    pattern = str(small / "train-{000000..000009}.tar")
    with pytest.raises(FileNotFoundError, match=r"train-\{000000\.\.000009\}\.tar.*5 of 10 shards missing"):
        build_train_loader(config(small, train_shards=pattern))
    with pytest.raises(ValueError, match="split 'test' is not in"):
        build_eval_loader(config(small, eval_split="test"))
    with pytest.raises(ValueError, match="shards_dir"):
        build_train_loader(DataConfig(img_size=SIZE))
    with pytest.raises(ValueError, match="rank=2"):
        build_eval_loader(config(small), rank=2, world_size=2)


def test_shard_patterns_pipe_file_and_fsspec_urls(small):
    fsspec = pytest.importorskip("fsspec")
    names = read_info(small).split("validation").filenames
    brace = str(small / f"validation-{{000000..{len(names) - 1:06d}}}.tar")
    loader = build_eval_loader(config(small, eval_shards=brace))
    assert len(loader) == -(-EVAL // 4)  # known: the _info.json beside the shards gives their lengths
    assert sorted(eval_keys(loader)[0]) == EVAL_KEYS

    piped = "::".join(f"pipe:cat {small / n}" for n in names)
    assert sorted(eval_keys(build_eval_loader(config(small, eval_shards=piped)))[0]) == EVAL_KEYS
    file_urls = "::".join(f"file://{small / n}" for n in names)
    assert sorted(eval_keys(build_eval_loader(config(small, eval_shards=file_urls)))[0]) == EVAL_KEYS

    memory = fsspec.filesystem("memory")
    for name in [*names, "_info.json"]:
        memory.pipe(f"/wds-test/{name}", (small / name).read_bytes())
    try:
        loader = build_eval_loader(config(small, eval_shards=None, shards_dir="memory://wds-test"))
        assert sorted(eval_keys(loader)[0]) == EVAL_KEYS
    finally:
        memory.rm("/wds-test", recursive=True)


def test_a_failing_pipe_is_a_counted_bad_shard(small):
    good = small / "validation-000000.tar"
    loader = build_eval_loader(config(small, eval_shards=f"pipe:cat {good}::pipe:cat /no/such/shard.tar"))
    keys, _ = eval_keys(loader)
    assert len(keys) == EVAL_PER_SHARD and loader.skip_counts["bad_shard"] == 1


@pytest.mark.parametrize(
    "field, value",
    [
        ("batch_size", 0),
        ("num_workers", -1),
        ("scale", (0.9, 0.2)),
        ("hflip", 1.5),
        ("interpolation", "cubic"),
        ("auto_augment", "bogus-m9"),
        ("label_smoothing", 1.0),
        ("crop_pct", 0.0),
        ("train_split", "a.b"),
        ("mean", (0.5, 0.5)),
        ("mixup_mode", "row"),
    ],
)
def test_bad_config_values_raise_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}: ") as raised:
        DataConfig(**{field: value})
    assert raised.value.key == field
    with pytest.raises(ConfigError, match=rf"^data\.{field}: "):  # keyed from the run config's root
        build_section(RunConfig, {"run": {"steps": 1}, "data": {field: list(value) if isinstance(value, tuple) else value}})


def test_config_cross_field_checks_and_building_from_a_mapping():
    with pytest.raises(ConfigError, match="^batch_size: must be even .* got 3"):
        DataConfig(batch_size=3, mixup_alpha=0.2)
    with pytest.raises(ConfigError, match="^img_sz: unknown key"):
        build_section(DataConfig, {"img_sz": 3})
    cfg = build_section(DataConfig, {"scale": [0.5, 1.0], "auto_augment": "rand-m9-mstd0.5-inc1"})
    assert cfg.scale == (0.5, 1.0)


def test_random_erasing_and_normalisation_happen_on_the_loaders_device(small):
    cfg = config(small, re_prob=1.0, re_mode="const", batches_per_epoch=1, num_workers=1)
    images, targets = next(iter(build_train_loader(cfg, device="cpu")))
    assert images.dtype == torch.float32 and images.is_contiguous() and targets.device.type == "cpu"
    # (x - mean) / std is never exactly 0 for integer pixels and ImageNet's mean, so zeros mark erased boxes
    erased = (images == 0).all(dim=1).flatten(1).sum(1)
    assert bool((erased > 0).all()), erased
    plain, _ = next(iter(build_train_loader(config(small, batches_per_epoch=1, num_workers=1))))
    assert int((plain == 0).sum()) == 0
    lowest = (0 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)  # a black pixel, per channel
    assert bool((plain >= lowest.view(1, 3, 1, 1) - 1e-5).all())
