import os

import pytest
import torch

# Reproducible and fair on 2-core CI machines.
torch.set_num_threads(int(os.environ.get("DIRALIGN_TEST_THREADS", "1")))


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"
