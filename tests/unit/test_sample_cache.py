"""The process's shard cache (data.cache_mb, `data/sample_cache.py`): a loader gets the same batches from it as
from disk, reads no kept shard again, keeps nothing from a damaged shard (whose problems are counted on every
read), stays within its bound, and is not used by loader workers."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch
from test_data_loaders import config, damaged_shards, eval_keys, small  # noqa: F401  (fixtures)

from mutransfer.data import build_eval_loader, build_train_loader
from mutransfer.data.sample_cache import PROCESS_CACHE, MiB
from mutransfer.data.writer import write_synthetic_shards
from mutransfer.errors import ConfigError


@pytest.fixture(autouse=True)
def empty_cache():
    PROCESS_CACHE.clear()
    PROCESS_CACHE.limit = 0  # raised again by the next loader, to its data.cache_mb
    yield
    PROCESS_CACHE.clear()
    PROCESS_CACHE.limit = 0


def eval_pass(cfg) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(batch.images.clone(), batch.targets.clone()) for batch in build_eval_loader(cfg)]


def train_batches(cfg) -> list[tuple[torch.Tensor, torch.Tensor]]:
    random.seed(0)  # in-process augmentation draws from the global RNGs, as a trial's does after seeding them
    np.random.seed(0)
    torch.manual_seed(0)
    return [(images.clone(), targets.clone()) for images, targets, *_ in build_train_loader(cfg)]


def assert_same(first, second) -> None:
    assert len(first) == len(second)
    for (images, targets), (images2, targets2) in zip(first, second):
        assert torch.equal(images, images2) and torch.equal(targets, targets2)


def test_a_second_pass_comes_from_memory_and_gives_the_same_batches(small):  # noqa: F811
    from_disk = eval_pass(config(small, cache_mb=0))
    assert PROCESS_CACHE.used == 0
    first = eval_pass(config(small))
    kept = PROCESS_CACHE.used
    assert kept > 0 and PROCESS_CACHE.hits == 0
    second = eval_pass(config(small))
    assert PROCESS_CACHE.hits > 0 and PROCESS_CACHE.used == kept  # nothing read or kept again
    assert_same(from_disk, first)
    assert_same(from_disk, second)


def test_training_batches_are_the_same_with_a_warm_cache(small):  # noqa: F811
    cfg = config(small, batches_per_epoch=30, hflip=0.5, scale=[0.3, 1.0])
    from_disk = train_batches(config(small, batches_per_epoch=30, hflip=0.5, scale=[0.3, 1.0], cache_mb=0))
    cold = train_batches(cfg)
    warm = train_batches(cfg)
    assert PROCESS_CACHE.hits > 0
    assert_same(from_disk, cold)
    assert_same(from_disk, warm)


def test_a_damaged_shard_is_never_kept_and_is_counted_on_every_read(damaged_shards):  # noqa: F811
    counts = []
    for _ in range(2):
        loader = build_eval_loader(config(damaged_shards))
        keys, _ = eval_keys(loader)
        counts.append((loader.skip_counts["corrupt_image"], loader.skip_counts["bad_shard"], len(keys)))
    assert counts[0] == counts[1] == (1, 1, counts[0][2])
    kept_urls = {version[0] for version in PROCESS_CACHE.shards}
    assert str(damaged_shards / "validation-000003.tar") not in kept_urls  # the truncated one
    assert str(damaged_shards / "validation-000002.tar") in kept_urls


def test_the_cache_stays_within_its_bound(small, tmp_path):  # noqa: F811
    big = tmp_path / "big"
    write_synthetic_shards(str(big), "validation", 4, 400, 64, 0, 100)
    eval_pass(config(big, img_size=64, cache_mb=1))
    assert 0 < PROCESS_CACHE.used <= 1 * MiB
    assert len(PROCESS_CACHE.shards) < 4  # not every shard fitted


def test_a_rewritten_shard_is_read_again(small, tmp_path):  # noqa: F811
    copy = tmp_path / "copy"
    shutil.copytree(small, copy)
    first = eval_keys(build_eval_loader(config(copy)))[0]
    shard = copy / "validation-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # now truncated: fewer samples
    again = eval_keys(build_eval_loader(config(copy)))[0]
    assert len(again) < len(first)


def test_loader_workers_keep_no_cache(small):  # noqa: F811
    eval_pass(config(small, num_workers=2))
    assert PROCESS_CACHE.used == 0 and PROCESS_CACHE.hits == 0


def test_cache_mb_must_not_be_negative(small):  # noqa: F811
    with pytest.raises(ConfigError, match="cache_mb"):
        config(small, cache_mb=-1).check()


def test_loaders_reading_in_step_read_each_shard_once(small):  # noqa: F811
    """A stack's seeds draw a batch each in turn: the first to open a shard reads it whole and keeps it, so
    the others find it kept rather than each parsing the tar while none has finished it."""
    loaders = [iter(build_train_loader(config(small, seed=seed, batches_per_epoch=4))) for seed in (0, 1, 2)]
    next(loaders[0])
    assert PROCESS_CACHE.shards and PROCESS_CACHE.hits == 0  # kept after one batch of 4: less than its shard
    for loader in loaders[1:]:
        next(loader)
    assert PROCESS_CACHE.hits > 0
