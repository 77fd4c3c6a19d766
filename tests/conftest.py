"""The test layout, and the fixtures both halves share.

Layout: `tests/unit` holds the tests that run in this one process (no subprocess launches, no multi-process
DeepSpeed, no servers, no browser, no torch.compile); `make test-fast` runs that folder. `tests/integration`
holds the tests that start real processes, DeepSpeed launches, servers, a browser or compiles; `make test`
runs both. The folder is the rule: every test under tests/integration is marked `slow` here at collection (so
`-m 'not slow'` still means "unit tests only"), and a test under tests/unit that is marked `slow` stops the
run, naming the test and the folder it belongs in. A `slow` mark written in an integration file says nothing
more. Helpers shared by both folders live in tests/train_helpers.py (tests/ is on sys.path through
pyproject's `pythonpath`); scripts a test runs by path sit next to it.

Fixtures: the suite's own cache folder, synthetic shard sets written by our own writer (any size, cached per
session), and images for the data tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_helpers import EVAL_PER_SHARD, EVAL_SAMPLES, copy_shards, cut_in_half, overwrite_middle

from mutransfer.data import write_synthetic_shards
from mutransfer.logs import configure_logging

configure_logging()  # tests that call train() or a command's function read stderr as the command line shows it

TESTS = Path(__file__).resolve().parent
UNIT, INTEGRATION = TESTS / "unit", TESTS / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The folder decides what is slow (see this module's docstring)."""
    misplaced = []
    for item in items:
        parents = Path(item.path).resolve().parents
        if INTEGRATION in parents:
            item.add_marker(pytest.mark.slow)
        elif UNIT in parents and item.get_closest_marker("slow"):
            misplaced.append(item.nodeid)
    if misplaced:
        raise pytest.UsageError("marked slow but under tests/unit (the folder decides; move them to "
                                "tests/integration): " + ", ".join(misplaced))


@pytest.fixture(scope="session", autouse=True)
def own_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The suite's cache folder (the MLflow store template, `train/sqlite_store.py`), inherited by the
    processes tests start: the suite leaves the user's ~/.cache alone."""
    folder = tmp_path_factory.mktemp("mutransfer_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MUTRANSFER_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """A factory of synthetic shard sets (train and validation splits, seed 0) written by our own writer, once
    per session for each set of arguments: modules that ask for the same set share one directory, so it is
    read-only (copy it to damage it). `validation_per_shard=None` writes the validation split as one shard."""
    made: dict[tuple[int, ...], Path] = {}

    def make(train: int, validation: int, train_per_shard: int = 128, validation_per_shard: int | None = None,
             classes: int = 10, size: int = 32) -> Path:
        validation_per_shard = validation_per_shard or validation
        key = (train, validation, train_per_shard, validation_per_shard, classes, size)
        if key not in made:
            out = tmp_path_factory.mktemp(f"shards_{classes}c_{size}px_{train}_{validation}")
            write_synthetic_shards(str(out), "train", classes, train, size, 0, train_per_shard)
            write_synthetic_shards(str(out), "validation", classes, validation, size, 0, validation_per_shard)
            made[key] = out
        return made[key]

    return make


@dataclass(frozen=True)
class SmallShards:
    """A synthetic shard set with train and validation splits, uneven on purpose: 5 train shards of
    12, 12, 12, 12, 2 samples and 5 validation shards of 5, 5, 5, 5, 3. Read-only: copy it to damage it."""

    path: Path
    train_samples: int = 50
    train_per_shard: int = 12
    eval_samples: int = 23
    eval_per_shard: int = 5
    classes: int = 4
    size: int = 16


@pytest.fixture(scope="session")
def small_shards(shard_set: Callable[..., Path]) -> SmallShards:
    s = SmallShards  # the dataclass's defaults
    return SmallShards(shard_set(s.train_samples, s.eval_samples, s.train_per_shard, s.eval_per_shard,
                                 classes=s.classes, size=s.size))


@pytest.fixture(scope="session")
def damaged(shard_set: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the fault probes' shard set (train_helpers.EVAL_SAMPLES) with validation shard 1 given 4 KiB of
    garbage in its middle, validation shard 2 cut in half, and train shard 0 damaged like validation shard 1.
    Read-only."""
    shards = shard_set(512, EVAL_SAMPLES, validation_per_shard=EVAL_PER_SHARD)
    out = copy_shards(shards, tmp_path_factory.mktemp("damaged") / "shards")
    overwrite_middle(out / "validation-000001.tar")
    cut_in_half(out / "validation-000002.tar")
    overwrite_middle(out / "train-000000.tar")
    return out


def gradient_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random smooth colour gradient: JPEG keeps it to within a few levels, while two of them differ by
    tens of levels, so pixel comparisons after a JPEG round trip can be tight."""
    y, x = np.mgrid[0:height, 0:width]
    slopes, offsets = rng.uniform(-4, 4, size=(2, 3)), rng.uniform(60, 190, size=3)
    return np.clip(offsets + x[..., None] * slopes[0] + y[..., None] * slopes[1], 0, 255).astype(np.uint8)


@pytest.fixture
def make_gradient() -> Callable[[np.random.Generator, int, int], np.ndarray]:
    return gradient_image


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """An ImageFolder tree (classes 'cat' and 'dog', 3 images each, JPEG and PNG) of 20 x 14 gradients, and
    the pixels of each file by its path relative to the root."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    pixels: dict[str, np.ndarray] = {}
    for class_name in ("cat", "dog"):
        (root / class_name).mkdir(parents=True)
        for i in range(3):
            array = gradient_image(rng, 14, 20)
            name = f"{class_name}/img{i}.{'png' if i % 2 else 'jpg'}"
            Image.fromarray(array).save(root / name)
            pixels[name] = array
    return root, pixels
