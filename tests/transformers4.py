"""transformers 4.57 beside the venv's transformers 5, for tests that load our artifacts the
way a deployment stack pinned to 4.x does (optimum-onnx pins 4.57.6).

``transformers4_dir()`` installs transformers 4.57.6 with the tokenizers and huggingface_hub
it needs (``pip install --target --no-deps``; torch, safetensors, numpy, requests, ... come
from the venv) into ``~/.cache/regap-export/transformers-4.57.6`` once, and returns that
folder. ``run_transformers4(script, *args)`` runs a Python file with that folder first on
``PYTHONPATH``, so ``import transformers`` is 4.57.6 there.

Without network access to the package index the install fails; the caller skips then
(``Transformers4Unavailable``), and fails on any other install error.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TRANSFORMERS4 = "4.57.6"
PACKAGES = (f"transformers=={TRANSFORMERS4}", "tokenizers==0.22.2", "huggingface_hub==0.36.0")
_NETWORK_ERRORS = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
                   "Name or service not known", "ConnectTimeoutError", "ReadTimeoutError", "Connection refused",
                   "(from versions: none)")  # no index answered at all


class Transformers4Unavailable(Exception):
    """transformers 4.x could not be installed for lack of network."""


def cache_root() -> Path:
    return Path(os.environ.get("REGAP_EXPORT_CACHE", Path.home() / ".cache" / "regap-export"))


def transformers4_dir() -> Path:
    folder = cache_root() / f"transformers-{TRANSFORMERS4}"
    if (folder / "transformers" / "__init__.py").is_file() and (folder / ".complete").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                 "--no-deps", "--target", str(tmp), *PACKAGES],
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            output = result.stdout + result.stderr
            if any(marker in output for marker in _NETWORK_ERRORS):
                raise Transformers4Unavailable(f"pip cannot reach the package index: {output.strip()[-300:]}")
            raise RuntimeError(f"pip install {' '.join(PACKAGES)} failed:\n{output[-3000:]}")
        (tmp / ".complete").write_text(" ".join(PACKAGES) + "\n")
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
