"""Calibration throughput: activation capture vs a plain forward pass, on the embedded model.

    python benchmarks/calibration_speed.py [--model embedded:smollm2] [--records 64] [--repeats 3]

Variants run interleaved on the same batches: a plain forward (logits, no hooks), capture
of every block (stops after the last block, so no LM head), and capture up to L/2 (stops
after block L/2 - 1). Reported as tokens per second and ratios to the plain forward.
"""
from __future__ import annotations

import argparse
import time

import torch

from _common import emit, median_and_spread, peak_rss_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from regap_export.calibration.capture import capture, requests_for
    from regap_export.data import load_bundled
    from regap_export.models.loading import load_model

    loaded = load_model(args.model)
    requests = requests_for(load_bundled("train")[: args.records], loaded.adapter, loaded.processor)
    num_layers = loaded.adapter.num_layers(loaded.model)
    batches = [requests[i:i + args.batch_size] for i in range(0, len(requests), args.batch_size)]
    encoded = [loaded.adapter.encode(loaded.processor, [r.prompt for r in b], None) for b in batches]
    tokens = sum(int(e["attention_mask"].sum()) for e in encoded)

    @torch.no_grad()
    def plain():
        for inputs in encoded:
            loaded.model(**inputs, use_cache=False)

    def capture_upto(last_layer: int):
        return lambda: capture(loaded.model, loaded.adapter, loaded.processor, requests,
                               layers=range(last_layer + 1), batch_size=args.batch_size, show_progress=False)

    variants = {"plain_forward": plain, "capture_all_blocks": capture_upto(num_layers - 1),
                "capture_to_half": capture_upto(num_layers // 2 - 1)}
    plain()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    stats = {name: median_and_spread(t) for name, t in times.items()}
    base = stats["plain_forward"]["median"]
    results = {"model": args.model, "records": len(requests), "tokens": tokens, "layers": num_layers,
               "seconds": stats, "tokens_per_second": {n: tokens / s["median"] for n, s in stats.items()},
               "speed_vs_plain": {n: base / s["median"] for n, s in stats.items()},
               "peak_rss_mib": peak_rss_mib()}
    rows = [(name, f"{tokens / s['median']:.0f}", f"{base / s['median']:.2f}x", f"{s['p10']:.2f}-{s['p90']:.2f}")
            for name, s in stats.items()]
    emit("calibration_speed", results, rows, ("variant", "tokens/s", "vs plain", "seconds p10-p90"))


if __name__ == "__main__":
    main()
