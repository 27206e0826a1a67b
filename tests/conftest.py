"""Shared pytest setup: repository root on sys.path, deterministic seeding, fixture directory."""
import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) does not add the repo root
    sys.path.insert(0, str(ROOT))

FIXTURES_DIR = ROOT / "tests" / "fixtures"


def pytest_configure(config):
    # Tests use tiny tensors: intra-op threads only add OpenMP spin-waiting, which on a shared
    # 2-core machine made the model tests ~4x slower. An explicit OMP_NUM_THREADS wins.
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state, so results do not depend on test order."""
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _restore_launch_environment():
    """A test that runs the launcher detection in-process (a simulated SLURM or torchrun environment) makes
    utils.dist export RANK/WORLD_SIZE/MASTER_*; a later in-process run would then wait for peers that never
    come. Every test starts and ends with the launch variables it found."""
    saved = {k: os.environ.get(k) for k in _LAUNCH_VARS}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _restore_modality_registry():
    """Tests (and the Taskonomy set-up) may register modalities such as 'normal'; every test starts from
    the registry as it was, so the order in which tests run does not matter."""
    from utils.data import modalities

    saved = dict(modalities.MODALITIES)
    yield
    modalities.MODALITIES.clear()
    modalities.MODALITIES.update(saved)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Directory of the golden fixtures produced with the published implementation."""
    return FIXTURES_DIR


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """32 training and 4 held-out synthetic scenes of 32 px (read-only; shared by the pre-training tests)."""
    from utils.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(str(root), num_train=32, num_val=4, image_size=32, seed=0)
    return root
