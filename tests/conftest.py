import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def small_records():
    """12 bundled training records (6 harmful, 6 harmless), fixed."""
    from regap_export.data import load_bundled

    records = load_bundled("train")
    harmful = [r for r in records if r.label == "harmful"][:6]
    harmless = [r for r in records if r.label == "harmless"][:6]
    return harmful + harmless
