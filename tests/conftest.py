import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers share the cores: one thread each for torch and ONNX Runtime
    # (regap_export.runtime reads OMP_NUM_THREADS), not a pool per worker spinning on both.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_records():
    """12 bundled training records (6 harmful, 6 harmless), fixed."""
    from regap_export.data import load_bundled

    records = load_bundled("train")
    harmful = [r for r in records if r.label == "harmful"][:6]
    harmless = [r for r in records if r.label == "harmless"][:6]
    return harmful + harmless
