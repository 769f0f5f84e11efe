"""Other transformers versions beside the venv's, for tests that load our artifacts the way
other stacks do: transformers 4.57.6 (optimum-onnx pins it) and 5.17 (the GPU machine's image).

``transformers4_dir()`` / ``gpu_image_transformers_dir()`` install that transformers with the
packages it needs that the venv has in other versions (``pip install --target --no-deps``;
torch, safetensors, numpy, ... come from the venv) into ``~/.cache/regap-export/NAME`` once,
and return that folder. ``run_transformers4(script, *args)`` runs a Python file with the 4.57.6
folder first on ``PYTHONPATH``, so ``import transformers`` is 4.57.6 there.

Without network access to the package index the install fails; the caller skips then
(``TransformersUnavailable``), and fails on any other install error.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TRANSFORMERS4 = "4.57.6"
TRANSFORMERS4_PACKAGES = (f"transformers=={TRANSFORMERS4}", "tokenizers==0.22.2", "huggingface_hub==0.36.0")
GPU_IMAGE_TRANSFORMERS = "5.17.0"
GPU_IMAGE_PACKAGES = (f"transformers=={GPU_IMAGE_TRANSFORMERS}", "huggingface_hub==1.33.0", "httpx==0.29.0",
                      "httpcore==1.0.9")
_NETWORK_ERRORS = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
                   "Name or service not known", "ConnectTimeoutError", "ReadTimeoutError", "Connection refused",
                   "(from versions: none)")  # no index answered at all


class TransformersUnavailable(Exception):
    """A pinned transformers could not be installed for lack of network."""


def cache_root() -> Path:
    return Path(os.environ.get("REGAP_EXPORT_CACHE", Path.home() / ".cache" / "regap-export"))


def transformers4_dir() -> Path:
    return pinned_dir(TRANSFORMERS4_PACKAGES, f"transformers-{TRANSFORMERS4}")


def gpu_image_transformers_dir() -> Path:
    return pinned_dir(GPU_IMAGE_PACKAGES, f"transformers-{GPU_IMAGE_TRANSFORMERS}")


def pinned_dir(packages: tuple[str, ...], name: str) -> Path:
    folder = cache_root() / name
    if (folder / "transformers" / "__init__.py").is_file() and (folder / ".complete").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                 "--no-deps", "--target", str(tmp), *packages],
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            output = result.stdout + result.stderr
            if any(marker in output for marker in _NETWORK_ERRORS):
                raise TransformersUnavailable(f"pip cannot reach the package index: {output.strip()[-300:]}")
            raise RuntimeError(f"pip install {' '.join(packages)} failed:\n{output[-3000:]}")
        (tmp / ".complete").write_text(" ".join(packages) + "\n")
        if not (folder / ".complete").is_file():  # else another process (an xdist worker) won the race
            shutil.rmtree(folder, ignore_errors=True)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process won the race just now
                pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def run_transformers4(script: Path, *args: str, modules_cache: Path, timeout: int = 600
                      ) -> subprocess.CompletedProcess:
    """Run ``script`` under transformers 4.57 (its folder alone on PYTHONPATH: nothing of this
    repository), with remote code cached in ``modules_cache``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(transformers4_dir()), TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
               HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(modules_cache))
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)
