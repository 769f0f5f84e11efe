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


# -- the tiny Llama and its default export, built once per test process --------------------
# Read-only: a test that changes files works on regap_testing.copy_of(folder, tmp_path).
@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory) -> Path:
    """The seeded tiny Llama (tests/tiny_models.py), saved with its tokenizer."""
    from tiny_models import save_tiny

    return save_tiny("llama", tmp_path_factory.mktemp("tiny-llama") / "llama")


@pytest.fixture(scope="session")
def llama_directions(tiny_llama_folder, tmp_path_factory) -> Path:
    """Realistic regap directions for it (regap_testing.options_for("regap"))."""
    from regap_testing import write_directions

    return write_directions(tiny_llama_folder, tmp_path_factory.mktemp("llama-directions") / "dirs")


@pytest.fixture(scope="session")
def exported_llama(tiny_llama_folder, llama_directions, tmp_path_factory) -> Path:
    """`regap-export export` of it with default options (safetensors + ONNX)."""
    from regap_testing import invoke

    out = tmp_path_factory.mktemp("llama-export") / "out"
    result = invoke("export", tiny_llama_folder, "--directions", llama_directions, "--out", out)
    assert result.exit_code == 0, result.output
    return out
