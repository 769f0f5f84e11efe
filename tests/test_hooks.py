"""models.hooks: the block-hook plumbing shared by capture, the reference, load_corrected and
the ONNX decoder wrapper."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from regap_export.models.hooks import (StopForward, block_hidden, block_hooks, last_token_index, replace_hidden,
                                       stopped_forward)


class Block(nn.Module):
    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple
        self.calls = 0

    def forward(self, h):
        self.calls += 1
        h = h + 1
        return (h, "extra") if self.as_tuple else h


class Stack(nn.Module):
    def __init__(self, as_tuple: bool):
        super().__init__()
        self.layers = nn.ModuleList(Block(as_tuple) for _ in range(4))

    def forward(self, h):
        for layer in self.layers:
            h = block_hidden(layer(h))
        return h


@pytest.mark.parametrize("as_tuple", [False, True])
def test_hidden_is_read_and_replaced_in_either_form(as_tuple):
    out = Block(as_tuple)(torch.zeros(1, 2, 3))
    assert torch.equal(block_hidden(out), torch.ones(1, 2, 3))
    new = replace_hidden(out, torch.full((1, 2, 3), 7.0))
    assert type(new) is type(out)
    assert torch.equal(block_hidden(new), torch.full((1, 2, 3), 7.0))
    if as_tuple:
        assert new[1:] == ("extra",)


@pytest.mark.parametrize("as_tuple", [False, True])
def test_stop_after_a_block_skips_the_rest_and_hooks_are_removed(as_tuple):
    model = Stack(as_tuple)
    seen = {}

    def read(layer):
        def hook(_module, _args, output):
            seen[layer] = block_hidden(output).clone()
            if layer == 1:
                raise StopForward
        return hook

    with block_hooks(model.layers, {0: read(0), 1: read(1)}), stopped_forward():
        model(torch.zeros(1, 1, 2))
    assert [b.calls for b in model.layers] == [1, 1, 0, 0]
    assert seen[1].flatten().tolist() == [2.0, 2.0]
    assert all(not b._forward_hooks for b in model.layers)
    # an edit made by a hook reaches the next block
    with block_hooks(model.layers, {0: lambda m, a, o: replace_hidden(o, block_hidden(o) * 10)}):
        assert model(torch.zeros(1, 1, 1)).item() == 13.0
    assert all(not b._forward_hooks for b in model.layers)


def test_hooks_are_removed_after_an_error():
    model = Stack(False)

    def fail(_module, _args, _output):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), block_hooks(model.layers, {2: fail}), stopped_forward():
        model(torch.zeros(1, 1, 1))
    assert all(not b._forward_hooks for b in model.layers)


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0]])
    assert last_token_index(mask, 3, 4).tolist() == [3, 3, 1]
    assert last_token_index(None, 2, 5).tolist() == [4, 4]
    assert last_token_index(mask, 3, 6).tolist() == [5, 5, 5]  # a mask of another length is ignored
