"""The multimodal ONNX split, runtime side (numpy only): the generic part.

Each multimodal family module declares a ``VisionRuntime`` on its adapter
(``ModelAdapter.vision_runtime``): which feeds the vision encoder takes for the processor's
pixel inputs (and which images are padding), and how the encoder's outputs become the
feature rows written at image-token positions. ``regap_export.models.vision_runtime_for``
looks one up. The export side is ``vision_export.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


def flatten_features(config: dict, outputs: dict[str, np.ndarray], **_: Any) -> np.ndarray:
    """Encoder outputs [images, tokens, hidden] that are already in token order -> rows."""
    features = outputs["image_features"]
    return features.reshape(-1, features.shape[-1])


@dataclass(frozen=True)
class VisionRuntime:
    # prepare(config, **pixel inputs) -> the vision encoder's feeds
    prepare: Callable[..., dict[str, np.ndarray]]
    # place(config, outputs, **pixel inputs) -> feature rows [image tokens, hidden], in token order
    place: Callable[..., np.ndarray] = flatten_features
