"""The GPU machine's image runs transformers 5.17 without torchvision, where the venv has a
newer transformers. Two things broke there and are mended in the package (docs/LIMITATIONS.md):
its ``Auto`` classes cannot load an Idefics3 or Qwen2-VL processor, and its GGUF reader gives
SmolLM2's tokenizer other special tokens. This slow test installs 5.17 beside the venv
(tests/pinned_transformers.py) and runs the tests of both fixes under it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS_UNDER_5_17 = ("tests/test_pil_processors.py", "tests/test_embedded.py::test_smolvlm_tokenizer_tokens")


@pytest.mark.slow
def test_processors_and_the_embedded_tokenizer_under_the_gpu_images_transformers(tmp_path):
    from pinned_transformers import GPU_IMAGE_TRANSFORMERS, TransformersUnavailable, gpu_image_transformers_dir

    try:
        pinned = gpu_image_transformers_dir()
    except TransformersUnavailable as exc:
        pytest.skip(f"transformers {GPU_IMAGE_TRANSFORMERS} cannot be installed without network: {exc}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHONPATH"))}
    env.update(PYTHONPATH=str(pinned), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    # xdist stays loaded (one process without -n): the repository's addopts pass it --dist
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "--basetemp", str(tmp_path / "run"), *TESTS_UNDER_5_17],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # The Auto classes really failed there (the fallback was needed, not merely tested).
    assert f"AutoImageProcessor needs torchvision in transformers {GPU_IMAGE_TRANSFORMERS}" in out, out[-4000:]
