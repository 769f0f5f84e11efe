"""Random models and synthetic (but well-behaved) ReGap constants for the benchmarks.

    python benchmarks/_synthetic.py directions MODEL OUT_DIR [--mode regap|fixed|regap-seq]

writes ``OUT_DIR/directions.safetensors`` for MODEL (a folder or ``embedded:smollm2``) with
the model's fingerprint, so ``regap-export export`` accepts it without a calibration run.

The constants are random, but scaled to the model: the drift has 10 % of the mean norm of
the block output, and the probe anchors c-/c+ are the 10th/90th percentiles of the
projections of real block outputs (random token ids) on the random unit direction, with
kappa = 2 logit(0.8), so gates fall in about 0.2-0.8 on typical tokens (tau = 0.5). Speed
does not depend on the values, but a gate stuck at 0 or 1 would make a run unrealistic.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GATE_LO, GATE_HI = 0.2, 0.8
KAPPA = 2 * math.log(GATE_HI / (1 - GATE_HI))  # g(q10) = 0.2, g(q90) = 0.8 with tau = 0.5

SHAPES = {
    # CPU-sized default (runs on two cores in minutes).
    "cpu": dict(hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=4, vocab=32000),
    # TinyLlama-1.1B widths; 16 blocks (the reference measurement's shape, 8 of 16 corrected).
    "tinyllama": dict(hidden=2048, intermediate=5632, layers=16, heads=32, kv_heads=4, vocab=32000),
    # TinyLlama-1.1B itself (22 blocks, ~1.1 B parameters).
    "tinyllama-1.1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
}


def random_llama(*, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
                 max_positions: int = 2048, seed: int = 0, device: str = "cpu"):
    """A seeded random-weight LlamaForCausalLM (untied head, like TinyLlama)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.eval()


@torch.no_grad()
def block_outputs(model, adapter, *, tokens: int = 64, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """Every block's output [batch * tokens, H] (float64) for random token ids."""
    blocks = adapter.decoder_layers(model)
    vocab = int(adapter.text_config(model.config).vocab_size)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, tokens), generator=gen)
    device = next(model.parameters()).device
    out: dict[int, torch.Tensor] = {}

    def make(i):
        def hook(_m, _i, output):
            h = output[0] if isinstance(output, tuple) else output
            out[i] = h.detach().reshape(-1, h.shape[-1]).to("cpu", torch.float64)
        return hook

    handles = [b.register_forward_hook(make(i)) for i, b in enumerate(blocks)]
    try:
        model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [out[i] for i in range(len(blocks))]


def gate_for(h: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """A random unit direction u and anchors (c-, c+) = 10th/90th percentile of h . u."""
    u = torch.randn(h.shape[-1], generator=gen, dtype=torch.float64)
    u = u / u.norm()
    p = h @ u
    lo, hi = float(torch.quantile(p, 0.1)), float(torch.quantile(p, 0.9))
    if hi - lo < 1e-9:
        hi = lo + 1.0
    return u, p, lo, hi


def gated_constants(h: torch.Tensor, gen: torch.Generator, drift_scale: float = 0.1):
    """(w [H], b, v [H], gates on h) for a folded gated correction whose gate spans ~0.2-0.8 on h."""
    u, p, lo, hi = gate_for(h, gen)
    gap = hi - lo
    w = KAPPA * u / gap
    b = -KAPPA * (lo / gap + 0.5)
    v = torch.randn(h.shape[-1], generator=gen, dtype=torch.float64)
    v = v / v.norm() * drift_scale * float(h.norm(dim=-1).mean())
    gates = torch.sigmoid(p * KAPPA / gap + b)
    return w.float(), float(b), v.float(), gates


def synthetic_directions(model, adapter, *, seed: int = 0, drift_scale: float = 0.1):
    from regap_export.calibration.directions import Directions

    hs = block_outputs(model, adapter, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    rhat, drift, c_neg, c_pos = [], [], [], []
    for h in hs:
        u, _p, lo, hi = gate_for(h, gen)
        d = torch.randn(h.shape[-1], generator=gen, dtype=torch.float64)
        d = d / d.norm() * drift_scale * float(h.norm(dim=-1).mean())
        rhat.append(u)
        drift.append(d)
        c_neg.append(lo)
        c_pos.append(hi)
    L = len(hs)
    c_neg_t, c_pos_t = torch.tensor(c_neg), torch.tensor(c_pos)
    return Directions(rhat=torch.stack(rhat).float(), drift=torch.stack(drift).float(),
                      anchor_text_harmful=c_pos_t.float().clone(), anchor_text_harmless=c_neg_t.float().clone(),
                      anchor_probe_harmful=c_pos_t.float().clone(), anchor_probe_harmless=c_neg_t.float().clone(),
                      kappa=torch.full((L,), KAPPA, dtype=torch.float32))


def write_directions(model_source: str, out_dir: Path, *, mode: str = "regap", seed: int = 0) -> Path:
    """directions.safetensors for ``model_source`` with its fingerprint (no calibration)."""
    from regap_export.calibration.directions_io import DirectionsFile, save_directions
    from regap_export.models.loading import load_model
    from regap_export.options import RegapOptions

    loaded = load_model(model_source)
    directions = synthetic_directions(loaded.model, loaded.adapter, seed=seed)
    options = RegapOptions(mode=mode).resolved(directions.num_layers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return save_directions(out_dir, DirectionsFile(directions, options, loaded.fingerprint, "0" * 64,
                                                   str(model_source)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("directions", help="write synthetic directions.safetensors for MODEL")
    d.add_argument("model")
    d.add_argument("out_dir", type=Path)
    d.add_argument("--mode", default="regap")
    d.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = write_directions(args.model, args.out_dir, mode=args.mode, seed=args.seed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
