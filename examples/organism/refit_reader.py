"""Refit the organism's cell reader (stage V1, closed form) on a wider vocabulary, keeping the LoRA.

    .venv/bin/python examples/organism/refit_reader.py --out DIR   # then: measure.py --weights DIR

The reader is a lookup over the tokens it was fitted on (README.md, "A closed-form reader"); a
token outside that vocabulary is read as an unrelated mixture. Build E's reader was fitted on the
tokens of build()'s prompts and the bundled set; the fresh splits were written later, so many of
their words were unreadable. This script refits V1 exactly as train.py does (same seeded random
features, same image offset) on build()'s tokens plus those of the held-out splits of
``train.READERS[--reader]`` ("s27": val ... fresh3, the reader shipped in sessions 27-28; "h":
build H's, every build's up to H and val ... fresh4; "i": build I's, up to I and fresh5; "j": build
J's, up to J and fresh6; "k": build K's, up to J and fresh7; "l": build L's, every build's and
every held-out split's), checks that those splits' requests read back token for token, and writes
DIR/vision.safetensors (fp16) beside a copy of the shipped lora.safetensors. The LoRA sees only
the reader's outputs (embedding row + offset), so it needs no retraining when the rows it knew are
read as before; ``cos old/new`` reports how close the old and new readers' image tokens are.
With one thread (the default) ``--reader s27`` writes session 27's vision.safetensors bit for bit;
the fit's SVD picks other signs with two, which gives an equivalent reader in other bits. The
vision side shipped in sessions 29-31 was train.py's own V1 (``ORGANISM_THREADS=2 train.py --reader
i --reader-only``: train.py's vocabulary holds one more token than this script's); since session
32 it is build L's (train.py --reader l, RESULTS.md "Build L").
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common as C
import data as D
import train as T

from regap_export.models import embedded as EMB


@torch.no_grad()
def _image_tokens_of(model, prompts, instructions):
    return torch.cat([T.image_tokens(model, torch.stack([prompts.pixels(t) for t in instructions[s:s + 32]]))
                      for s in range(0, len(instructions), 32)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for vision.safetensors + lora.safetensors")
    ap.add_argument("--reader", choices=sorted(T.READERS), default="s27",
                    help="the vocabulary (train.READERS): s27 (session 27's vision side), h (build H's), "
                         "i (build I's), j (build J's), k (build K's), l (build L's: every build's and split's tokens)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("ORGANISM_THREADS", "1")))
    t0 = time.time()
    shipped, processor = EMB.build_organism()
    model, _ = EMB.build_organism_untrained()
    prompts = C.Prompts(processor)
    held_out = {s: D.records(s) for s in T.READERS[args.reader].splits}
    wide, _ = T.reader_vocab(prompts.tok, T.reader_records(args.reader))
    print(f"reader vocabulary ({args.reader}): {len(wide)} tokens")

    bank = T.CellBank(prompts, wide)
    embed = model.model.text_model.embed_tokens.weight.detach()
    blank = embed[prompts.tok.convert_tokens_to_ids("\u0120")]
    offset = T.image_offset(model, 1.0)
    T.set_seed(T.SEED)
    mean_cos, min_cos = T.fit_reader(model, bank, embed[torch.tensor(bank.ids)].clone(), blank, offset=offset)
    print(f"V1 refitted: cell -> row cosine mean {mean_cos:.4f} min {min_cos:.4f}")

    failed = []
    for split, rows in held_out.items():
        acc, cos = T.reader_accuracy(model, bank, None, prompts, rows, offset)
        old_acc, _ = T.reader_accuracy(shipped, bank, None, prompts, rows, offset)
        texts = [r["instruction"] for r in rows]
        same = F.cosine_similarity(_image_tokens_of(model, prompts, texts),
                                   _image_tokens_of(shipped, prompts, texts), dim=-1).mean().item()
        print(f"{split:10s} nearest-row accuracy {old_acc:.3f} (shipped) -> {acc:.3f}, cos {cos:.4f}; "
              f"cos old/new image tokens {same:.4f}")
        if acc < 1.0:
            failed.append(split)
    if failed:
        raise SystemExit(f"the refitted reader misreads tokens of {', '.join(failed)}; nothing written")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(dir=out) as tmp:
        save_file(T.vision_state(model), str(Path(tmp) / "vision.safetensors"))
        shutil.copyfile(EMB.ORGANISM_DIR / "lora.safetensors", Path(tmp) / "lora.safetensors")
        for name in ("vision.safetensors", "lora.safetensors"):
            os.replace(Path(tmp) / name, out / name)
    print(f"wrote {out}/vision.safetensors and lora.safetensors in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
