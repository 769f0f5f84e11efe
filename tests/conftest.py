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


# -- embedded:smollm2 calibrated and exported once per test process -------------------------
# Real weights: a calibration takes about 90 s and an export about 180 s on two cores, so the
# slow tier's real-model checks (test_real_model.py) and the clients' SmolLM2 runs
# (test_clients.py) share one of each. Every test that uses them carries
# ``pytest.mark.xdist_group(regap_testing.SMOLLM2_GROUP)`` (addopts has --dist loadgroup), so
# one worker builds them. The export (about 1 GB) is kept for the whole session.


@pytest.fixture(scope="session")
def smollm2_calibration(tmp_path_factory) -> Path:
    """``calibrate embedded:smollm2`` with the tool's defaults (bundled train split)."""
    from regap_export.calibration import folder as api

    out = tmp_path_factory.mktemp("smollm2-calibration") / "directions"
    api.calibrate_to_folder("embedded:smollm2", out, batch_size=16, show_progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_export(smollm2_calibration, tmp_path_factory) -> Path:
    """``export embedded:smollm2`` with those directions (mode regap, ONNX + safetensors), as the
    demo exports. Read-only: tests validate it with ``write=False``."""
    from regap_export.export.pipeline import export_to_folder

    out = tmp_path_factory.mktemp("smollm2-export") / "corrected"
    return export_to_folder("embedded:smollm2", smollm2_calibration, out, formats=("onnx", "safetensors"))


# -- the README's main job, run once per test process ---------------------------------------
@pytest.fixture(scope="session")
def organism_demo(tmp_path_factory) -> tuple[Path, str]:
    """``regap-export demo`` as the README's quick start runs it (its default model, the
    organism), in a temporary folder: (the folder, the command's output). test_demo.py checks
    the run; test_clients.py runs the organism export it wrote in transformers.js (both carry
    ``pytest.mark.xdist_group(regap_testing.ORGANISM_GROUP)``)."""
    from regap_testing import invoke

    out = tmp_path_factory.mktemp("demo") / "demo"
    result = invoke("demo", "--out", out)
    assert result.exit_code == 0, result.output[-4000:]
    return out, result.output
