"""The exporter says when torch.onnx fell back from torch.export's non-strict capture."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import torch
from torch.export import Dim

from regap_export.export import onnx_export


def test_non_strict_capture_is_used_and_silent(caplog):
    module = torch.nn.Linear(4, 3).eval()
    with caplog.at_level(logging.WARNING, logger=onnx_export.log.name):
        program = onnx_export._torch_onnx_export(module, (torch.randn(2, 4),), dynamic_shapes={"input": {0: Dim("b")}},
                                                 input_names=["x"], output_names=["y"], opset=18)
    # The private attribute the warning reads: if torch renames it, this test says so.
    assert program._capture_strategy == "TorchExportNonStrictStrategy"
    assert not [r for r in caplog.records if "fell back" in r.getMessage()]


def test_fallback_to_strict_capture_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger=onnx_export.log.name):
        onnx_export._warn_on_capture_fallback(SimpleNamespace(_capture_strategy="TorchExportStrictStrategy"), "Decoder")
    messages = [r.getMessage() for r in caplog.records]
    assert any("fell back to TorchExportStrictStrategy" in m and "Decoder" in m for m in messages), messages
