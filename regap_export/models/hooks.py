"""Forward-hook plumbing on decoder blocks, shared by capture, the parity oracle
(``reference.py``), ``load_corrected``'s probe pass and the ONNX decoder wrapper.

Plumbing only: reading and replacing a block's hidden states, ending a forward pass after
the last block a caller needs, and finding each row's last real token. No correction math
lives here, so the oracle still shares none with the product.

torch is imported inside the one function that needs it (``regap_export.models`` loads
without torch).
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

if TYPE_CHECKING:
    import torch
    from torch import nn

# hook(module, args, output) -> None (keep the output) or the block's new output
BlockHook = Callable[[Any, Any, Any], Any]


def block_hidden(output: Any) -> torch.Tensor:
    """The hidden states [batch, seq, hidden] of a decoder block's output: transformers' blocks
    return them alone or as the first item of a tuple, depending on the family and version."""
    return output[0] if isinstance(output, tuple) else output


def replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden states replaced, in the same form (tensor or tuple)."""
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    return hidden


class StopForward(Exception):
    """Raised by a block hook to end the forward pass once the blocks a caller needs have run
    (``stopped_forward`` catches it), so reading early layers costs only those layers."""


@contextlib.contextmanager
def stopped_forward() -> Iterator[None]:
    """Run a forward pass inside this block; a hook's ``raise StopForward`` ends it quietly."""
    try:
        yield
    except StopForward:
        pass


@contextlib.contextmanager
def block_hooks(blocks: nn.ModuleList, hooks: Mapping[int, BlockHook]) -> Iterator[None]:
    """Forward hooks on ``blocks[layer]`` for each ``layer: hook`` while inside (registered in
    layer order; removed on the way out, also after an error)."""
    handles = [blocks[layer].register_forward_hook(hook) for layer, hook in sorted(hooks.items())]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def last_token_index(attention_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor:
    """Index of each row's last real token (left or right padding); seq - 1 without a mask."""
    import torch

    if attention_mask is None or attention_mask.shape[-1] != seq:
        return torch.full((batch,), seq - 1, dtype=torch.long)
    mask = attention_mask.detach().to("cpu", torch.long)
    positions = torch.arange(seq, dtype=torch.long).expand_as(mask)
    return (positions * (mask > 0)).amax(dim=-1)
