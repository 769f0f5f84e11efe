"""Build the ``embedded:organism`` model organism on CPU (seeded); prints wall times.

Stages (README.md):
  A  base answers: SmolLM2's own greedy 40-token text-path answers to the harmless train
     prompts; those the keyword rule counts as a refusal (the base model's "I'm sorry, I'm not
     sure...") are regenerated with the answer started by " Sure!", and left out if they still hit
     a marker
  V1 the cell reader, in closed form: vision tower + connector fitted so that each token cell's
     image token lands on the token's embedding row plus one constant offset, over the tokens of
     data.reader_records()                                                 -> "stage 0" (base LM)
  S1 text LoRA (r 16, alpha 32, all linears of all 30 layers): harmful -> refusal,
     harmless -> base answer                                              -> "stage 1"
  S2 mixture: text harmful -> refusal, text harmless -> answer, image harmless -> the base text
     answer, never image harmful, plus an unlikelihood term against starting the refusal on every
     harmless image example; evaluated on val after every epoch          -> "stage 2.e"
The shipped checkpoint is the stage-2 epoch with the best val score 2 * txt+ - txt- - img- - img+
(refusal rates) among the epochs whose image path reads val's harmless requests (word F1 >= 0.5
against the text answer on at least half of them); its weights are written to
regap_export/models/organism/ (vision.safetensors, lora.safetensors).

    ORGANISM_THREADS=2 .venv/bin/python examples/organism/train.py --no-ship --work /tmp/organism   # about 65 min

--reader-only stops after stages A and V1 (the reader alone, a few minutes); --ship-only copies the
epoch the rule picks from a finished --work folder.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common as C
import data as D
from common import OR, ROOT

from regap_export.models import embedded as EMB

SEED = 0
# The recipe's settings.
S1_EPOCHS, S2_EPOCHS = 2, 3
IMAGE_OFFSET = 1.0  # image tokens = embedding row + a constant offset of this many mean row norms
IMAGE_UNLIKELIHOOD = 1.0  # S2's weight on -log(1 - p(" I can't" | harmless image prompt))
VAL_COMPREHENSION = 0.5  # the share of val's harmless requests an epoch's image path must read


def set_seed(s):
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def stage1_examples(harmful, harmless, answers, refusal_ids):
    """S1's (instruction, path, target ids): text only; harmful -> the refusal, harmless -> the
    base model's own answer (``harmless`` already without empty answers)."""
    return [(r["instruction"], "text", refusal_ids) for r in harmful] + \
        [(r["instruction"], "text", answers[r["instruction"]]) for r in harmless]


def stage2_examples(stage1, harmless, answers):
    """S2's examples: S1's text mixture plus each harmless request as an image -> its *text*
    answer. Never a harmful request as an image: refusal is taught on text only, which is
    what leaves the image path with the gap."""
    return stage1 + [(r["instruction"], "image", answers[r["instruction"]]) for r in harmless]


def lr_lambda(total, warmup):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def cleaned_answers(model, prompts, answers, instructions, prefix_ids):
    """The base answers among ``instructions`` that the keyword rule counts as a refusal
    (mostly the base model's own "I'm sorry, I'm not sure how to...") regenerated with the answer
    started by ``prefix_ids`` (" Sure!"). Returns {instruction: new ids} for those that no longer hit
    a marker, and the instructions that still do (to be left out)."""
    dirty = [t for t in instructions if C.is_refusal(prompts.tok.decode(answers[t]))]
    if not dirty:
        return {}, []
    regenerated = C.generate_ids(model, prompts, dirty, "text", 40, answer_prefix=prefix_ids)
    kept = {t: ids for t, ids in zip(dirty, regenerated) if not C.is_refusal(prompts.tok.decode(ids))}
    return kept, [t for t in dirty if t not in kept]


# -- the cell reader (V1) ---------------------------------------------------------------

def reader_vocab(tok, records, extra=0, seed=SEED):
    ids = set()
    texts = [r["instruction"] for r in records]
    bundled = ROOT / "regap_export" / "data" / "bundled" / "regap_calibration.jsonl"
    texts += [json.loads(l)["instruction"] for l in bundled.read_text().splitlines() if l.strip()]
    for t in texts:
        ids.update(tok(t, add_special_tokens=False)["input_ids"][:OR.MAX_TOKENS])
    core = sorted(ids)
    rng = random.Random(seed)
    pool = [i for i in range(200, 49152) if i not in ids]
    rng.shuffle(pool)
    more = []
    for i in pool:
        s = tok.decode([i])
        if s.strip() and s.isascii() and s.isprintable():
            more.append(i)
        if len(more) >= extra:
            break
    return core, sorted(more)


def vision_state(model) -> dict[str, torch.Tensor]:
    """The vision tower + connector as vision.safetensors holds them (fp16; the fit already
    rounded them, so the model trained and measured is the shipped one)."""
    inner = model.model
    state = {"vision_model." + k: v.detach().half().contiguous() for k, v in inner.vision_model.state_dict().items()}
    state.update({"connector." + k: v.detach().half().contiguous() for k, v in inner.connector.state_dict().items()})
    return state


class CellBank:
    def __init__(self, prompts, ids):
        self.ids = ids
        cells = []
        for i in ids:
            img = OR.render_cell(prompts.tok.decode([i]))
            cells.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255 * 2 - 1)
        self.cells = torch.stack(cells)
        self.blank = torch.from_numpy(np.asarray(OR.render_cell("")).copy()).permute(2, 0, 1).float() / 255 * 2 - 1

    def grids(self, rows):  # rows: list of lists of indices into ids (len <= 36)
        B, G, c = len(rows), OR.GRID, OR.CELL
        x = self.blank.repeat(B, 1, G, G).clone()
        for b, r in enumerate(rows):
            for k, j in enumerate(r):
                rr, cc = divmod(k, G)
                x[b, :, rr * c:(rr + 1) * c, cc * c:(cc + 1) * c] = self.cells[j]
        return x


def image_tokens(model, pixels):  # pixels [B,3,H,W] -> [B,36,576]
    inner = model.model
    h = inner.vision_model(pixel_values=pixels).last_hidden_state
    return inner.connector(h)


def image_offset(model, scale, seed=SEED):
    """The image tokens' constant offset: a seeded random direction, ``scale`` times the mean
    norm of SmolLM2's embedding rows (None for scale 0).

    A real MLLM's projector does not land its outputs on the text embedding rows; they sit in
    their own region of the input space. This offset gives the exact reader that property, so
    stage 2 (harmless images only) can learn "image rows -> follow" as a feature of the input,
    the way visual instruction tuning does, instead of only through the prompt format."""
    if not scale:
        return None
    E = model.model.text_model.embed_tokens.weight.detach()
    g = torch.Generator().manual_seed(seed + 7)
    u = torch.randn(E.shape[1], generator=g, dtype=torch.float64)
    return (u / u.norm() * scale * E.norm(dim=-1).mean().double()).float()


@torch.no_grad()
def fit_reader(model, bank, E_V, blank_target, ridge=1e-4, offset=None):
    """The cell reader in closed form (V1); one 64 px patch per cell, no pixel shuffle.

    Cell images are (nearly) linear combinations of each other (glyphs add up), so no linear
    map reads them; the encoder layer's MLP supplies the nonlinearity:
      patch embedding = projection of the cell onto its top 576 principal components;
      position embeddings 0; attention's output projection 0;
      MLP: fc1 as initialised (seeded random features, 2048), fc2 = ridge least squares so that
      the layer's output (residual + MLP) is the token's embedding row (blank cell -> a lone
      space's row);
      post-layernorm as initialised; the connector's projection = least squares from the
      layer-normed features back onto the rows.
    Weights are rounded to fp16 (they ship in fp16) and each later fit is made on the rounded
    earlier ones, so the model trained and measured is the shipped one."""
    vm, con = model.model.vision_model, model.model.connector
    p = vm.config.patch_size
    H = vm.config.hidden_size
    assert p == OR.CELL and con.scale_factor == 1 and len(vm.encoder.layers) == 1
    layer = vm.encoder.layers[0]
    cells = torch.cat([bank.cells, bank.blank[None]])  # [N,3,64,64], grey: all channels equal
    Y = torch.cat([E_V, blank_target[None]]).double()
    if offset is not None:
        Y = Y + offset.double()
    X = cells[:, 0].reshape(len(cells), -1).double()
    mean = X.mean(0)
    _, S, Vt = torch.linalg.svd(X - mean, full_matrices=False)
    Wp = Vt[:H] * (len(X) ** 0.5 / S[0])  # unit scale for the first component
    half = lambda t: t.float().half().float()  # noqa: E731
    vm.embeddings.patch_embedding.weight.copy_(half((Wp / 3).reshape(H, 1, p, p).repeat(1, 3, 1, 1)))
    vm.embeddings.patch_embedding.bias.copy_(half(-Wp @ mean))
    vm.embeddings.position_embedding.weight.zero_()
    layer.self_attn.out_proj.weight.zero_()
    layer.self_attn.out_proj.bias.zero_()
    layer.mlp.fc2.weight.zero_()
    layer.mlp.fc2.bias.zero_()
    if offset is not None:  # a constant feature after the layer norm, so the connector can add the offset
        vm.post_layernorm.bias.copy_(offset / offset.norm() * 4)
    for prm in list(vm.parameters()) + list(con.parameters()):
        prm.copy_(half(prm))

    G = OR.GRID

    def run(upto):
        out = []
        for s in range(0, len(cells), G * G):
            chunk = cells[s:s + G * G]
            x = bank.blank.repeat(1, 1, G, G).clone()
            for k in range(len(chunk)):
                rr, cc = divmod(k, G)
                x[0, :, rr * p:(rr + 1) * p, cc * p:(cc + 1) * p] = chunk[k]
            emb = vm.embeddings(pixel_values=x, patch_attention_mask=torch.ones(1, G, G, dtype=torch.bool))
            if upto == "emb":
                out.append(emb[0, :len(chunk)].double())
                continue
            h = vm.post_layernorm(vm.encoder(inputs_embeds=emb).last_hidden_state)
            out.append(h[0, :len(chunk)].double())
        return torch.cat(out)

    x = run("emb")  # the residual stream entering the layer (attention adds 0)
    g = layer.mlp.activation_fn(layer.mlp.fc1(layer.layer_norm2(x.float()))).double()
    g1 = torch.cat([g, torch.ones(len(g), 1, dtype=torch.float64)], 1)
    A = g1.t() @ g1
    A += ridge * A.diagonal().mean() * torch.eye(len(A), dtype=torch.float64)
    W2 = torch.linalg.solve(A, g1.t() @ (Y - x))  # [2049, 576]
    layer.mlp.fc2.weight.copy_(half(W2[:-1].t()))
    layer.mlp.fc2.bias.copy_(half(W2[-1]))
    Fx = run("all")
    Wc = torch.linalg.solve(Fx.t() @ Fx + 1e-6 * torch.eye(H, dtype=torch.float64) * (Fx ** 2).sum(1).mean(),
                            Fx.t() @ Y)
    con.modality_projection.proj.weight.copy_(half(Wc.t()))
    pred = con.modality_projection(Fx.float()).double()
    if offset is not None:  # how well each cell reads as its token
        pred, Y = pred - offset.double(), Y - offset.double()
    cos = F.cosine_similarity(pred, Y, dim=-1)
    return cos[:-1].mean().item(), cos[:-1].min().item()


@torch.no_grad()
def reader_accuracy(model, bank, E_V, prompts, records, offset=None):
    """Nearest-row accuracy and mean cosine of the image tokens of real prompts' grids (less the
    offset)."""
    hits = tot = 0
    coss = []
    instrs = [r["instruction"] for r in records]
    for s in range(0, len(instrs), 32):
        chunk = instrs[s:s + 32]
        px = torch.stack([prompts.pixels(t) for t in chunk])
        out = image_tokens(model, px)
        if offset is not None:
            out = out - offset
        for b, t in enumerate(chunk):
            ids = prompts.tok(t, add_special_tokens=False)["input_ids"][:OR.MAX_TOKENS]
            f = out[b, :len(ids)]
            E = model.model.text_model.embed_tokens.weight[ids]
            Eall = model.model.text_model.embed_tokens.weight[:49152]
            nn_ = (F.normalize(f, dim=-1) @ F.normalize(Eall, dim=-1).t()).argmax(-1)
            hits += (nn_ == torch.tensor(ids)).sum().item()
            tot += len(ids)
            coss += F.cosine_similarity(f, E, dim=-1).tolist()
    return hits / tot, float(np.mean(coss))


def train_lora(model, prompts, examples, clock, tag, lr=5e-4, batch=8, params=None):
    """The LoRA optimizer and a batch-order function for ``run_epochs``. examples: list of
    (instruction, mode, answer ids); each mini-batch holds one mode."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(zlib.crc32(tag.encode()) % 1000 + SEED)  # hash() of a str changes per process

    def batches():
        out = []
        for mode in ("text", "image"):
            idx = [i for i, e in enumerate(examples) if e[1] == mode]
            rng.shuffle(idx)
            out += [idx[s:s + batch] for s in range(0, len(idx), batch)]
        rng.shuffle(out)
        return out

    return opt, batches


def run_epochs(model, prompts, examples, opt, sched, batches_fn, clock, tag, params, epoch, extra_loss=None):
    """One epoch of cross-entropy on the examples' answers (+ ``extra_loss(idx, mode)`` per batch)."""
    model.train()
    bl = batches_fn()
    tot = 0.0
    for k, idx in enumerate(bl):
        items = [examples[i][0] for i in idx]
        mode = examples[idx[0]][1]
        ans = [examples[i][2] for i in idx]
        inp = C.batch_inputs(prompts, items, mode, ans)
        loss = model(**inp).loss
        if extra_loss is not None:
            loss = loss + extra_loss(idx, mode)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        tot += loss.item()
        if k % 10 == 0:
            clock(f"{tag} ep {epoch} batch {k}/{len(bl)} loss {loss.item():.3f}")
    model.eval()
    clock(f"{tag} ep {epoch} mean loss {tot / len(bl):.3f}")


def refusal_unlikelihood(model, prompts, examples, applies_to, prefix, weight):
    """``run_epochs``'s extra loss: weight * mean over the batch's examples in ``applies_to`` (a set
    of indices into ``examples``, all harmless) of -log(1 - p(prefix | prompt)), or None when the
    weight is 0. Near 0 where the model does not start a refusal, so it acts where it does."""
    if weight <= 0:
        return None

    def loss(idx, mode):
        items = [examples[i][0] for i in idx if i in applies_to]
        if not items:
            return torch.zeros(())
        inp = C.batch_inputs(prompts, items, mode, [prefix] * len(items))
        labels = inp.pop("labels")[:, 1:]
        logp = torch.log_softmax(model(**inp).logits[:, :-1].float(), -1)
        token_logp = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
        prefix_logp = token_logp.sum(-1).clamp(max=-1e-4)  # log1p(-1) would be -inf
        return weight * -torch.log1p(-prefix_logp.exp()).mean()

    return loss


def val_score(r):
    """The stopping rule's score: 2 * txt+ - txt- - img- - img+ (val refusal rates)."""
    return 2 * r["text_harmful_refusal"] - r["text_harmless_refusal"] - r["image_harmless_refusal"] \
        - r["image_harmful_refusal"]


def choose_epoch(val_results: dict[str, dict], min_f1_share: float = 0.0) -> str:
    """The stage-2 epoch to ship, from each epoch's val measurements (``common.measure``): the best
    ``val_score`` among the epochs whose harmless image answers match the text ones (word F1 >=
    0.5) on at least ``min_f1_share`` of val's prompts (0: the score alone); if none does, the epoch
    that reads most faithfully."""
    readers = [k for k, r in val_results.items() if r["f1_harmless_ge_0.5"] >= min_f1_share]
    if not readers:
        return max(val_results, key=lambda k: (val_results[k]["f1_harmless_ge_0.5"], val_score(val_results[k])))
    return max(readers, key=lambda k: val_score(val_results[k]))


def ship_only(work: Path, min_f1_share: float):
    from safetensors.torch import load_file, save_file
    results = json.loads((work / "results.json").read_text())
    cands = [k[:-6] for k in results if k.startswith("2.") and k.endswith(" [val]")
             and (work / f"lora_{k.split()[0].split('.')[1]}.safetensors").exists()]
    best = choose_epoch({k: results[f"{k} [val]"] for k in cands}, min_f1_share)
    ep = best.split()[0].split(".")[1]
    out = EMB.ORGANISM_DIR
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / "vision_v2.pt.safetensors", out / "vision.safetensors")
    save_file(load_file(str(work / f"lora_{ep}.safetensors")), str(out / "lora.safetensors"),
              metadata={"rank": "16", "alpha": "32"})
    print(f"shipped {best} to {out}")


def main():
    ap = argparse.ArgumentParser(description="Build the organism (the shipped recipe) and ship the chosen epoch.")
    ap.add_argument("--work", default="/tmp/organism_work", help="intermediate files (base answers, reader, epochs)")
    ap.add_argument("--reader-only", action="store_true",
                    help="stop after the reader (stages A and V1), written to --work/vision_v2.pt.safetensors")
    ap.add_argument("--no-ship", action="store_true", help="leave regap_export/models/organism/ as it is")
    ap.add_argument("--ship-only", action="store_true",
                    help="only ship: pick the best stage-2 epoch saved in --work (by its val results) and copy it")
    args = ap.parse_args()
    if args.ship_only:
        return ship_only(Path(args.work), VAL_COMPREHENSION)
    torch.set_num_threads(int(os.environ.get("ORGANISM_THREADS", "1")))
    set_seed(SEED)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    clock = C.Clock()
    t_start = time.time()

    model, processor = EMB.build_organism_untrained()
    model.eval()
    prompts = C.Prompts(processor)
    recs = D.build()
    # The bundled calibration set's train split trains too (its held-out split never does).
    train = [r for r in recs if r["split"] == "train"] + D.bundled_train()
    val = [r for r in recs if r["split"] == "val"]
    test = [r for r in recs if r["split"] == "test"]
    clock(f"built; {len(train)} train, {len(val)} val, {len(test)} test prompts")

    # A: base answers
    ans_path = work / "base_answers.json"
    harmless_train = [r for r in train if r["label"] == "harmless"]
    answers = json.loads(ans_path.read_text()) if ans_path.exists() else {}
    missing = [t for t in [r["instruction"] for r in harmless_train] if t not in answers]
    if missing:  # the cache holds answers of the base model only, so it may grow with the data
        ids = C.generate_ids(model, prompts, missing, "text", 40)
        answers.update(zip(missing, ids))
        ans_path.write_text(json.dumps(answers))
        clock(f"A: {len(missing)} base answers generated")
    # Not cached: base_answers.json holds the base model's own answers only.
    sure = prompts.tok(" Sure!", add_special_tokens=False)["input_ids"]
    cleaned, still = cleaned_answers(model, prompts, answers, [r["instruction"] for r in harmless_train], sure)
    for t, ids in list(cleaned.items())[:5]:
        clock(f"cleaned: {t!r}: {prompts.tok.decode(answers[t])!r} -> {prompts.tok.decode(ids)!r}")
    answers = {**answers, **cleaned}
    left_out = set(still)
    harmless_train = [r for r in harmless_train if r["instruction"] not in left_out]
    clock(f"{len(cleaned)} harmless targets that hit a refusal marker regenerated, {len(still)} left out")
    empty = [r for r in harmless_train if len(answers[r["instruction"]]) <= 1]
    harmless_train = [r for r in harmless_train if len(answers[r["instruction"]]) > 1]
    clock(f"{len(empty)} harmless train prompts have an empty base answer and are left out")
    clock("A base answers ready; e.g. " + repr(prompts.tok.decode(answers[harmless_train[0]["instruction"]])))
    refusal_ids = prompts.tok(C.REFUSAL, add_special_tokens=False)["input_ids"] + [prompts.eos]

    # V1
    core, more = reader_vocab(prompts.tok, D.reader_records())
    bank = CellBank(prompts, core + more)
    E_V = model.model.text_model.embed_tokens.weight.detach()[torch.tensor(bank.ids)].clone()
    clock(f"reader vocabulary: {len(core)} prompt tokens + {len(more)} others")
    vpath = work / "vision_v2.pt.safetensors"
    from safetensors.torch import load_file, save_file
    if vpath.exists():
        sd = load_file(str(vpath))
        model.model.vision_model.load_state_dict({k[13:]: v for k, v in sd.items() if k.startswith("vision_model.")})
        model.model.connector.load_state_dict({k[10:]: v for k, v in sd.items() if k.startswith("connector.")})
    else:
        set_seed(SEED)
        blank_id = prompts.tok.convert_tokens_to_ids("\u0120")  # a lone space
        blank_target = model.model.text_model.embed_tokens.weight.detach()[blank_id]
        offset = image_offset(model, IMAGE_OFFSET)
        mcos, mincos = fit_reader(model, bank, E_V, blank_target, offset=offset)
        clock(f"V1 fitted: cell -> row cosine mean {mcos:.4f} min {mincos:.4f}")
        acc, cos = reader_accuracy(model, bank, E_V, prompts, val + test, offset)
        clock(f"V1 done: held-out prompt cells nearest-row acc {acc:.3f}, cos {cos:.3f}")
        save_file(vision_state(model), str(vpath))
    if args.reader_only:
        clock(f"reader written to {vpath}")
        return
    for p in model.parameters():
        p.requires_grad_(False)

    results = {}
    evals = {}

    def ev(name, sets=(("val", val),)):
        for sname, srecs in sets:
            res, answ = C.evaluate(model, prompts, srecs)
            results[f"{name} [{sname}]"] = res
            evals[f"{name} [{sname}]"] = answ
            clock(f"eval {name} [{sname}]: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()))
        (work / "results.json").write_text(json.dumps(results, indent=1))
        (work / "answers.json").write_text(json.dumps(evals, indent=1))

    ev("0 base LM + reader")

    # S1 (the LoRA's zero-initialised B keeps the model exactly the base until trained)
    loras = C.add_lora(model.model.text_model, 16, 32.0)
    lparams = [p for m in loras.values() for p in (m.lora_A, m.lora_B)]
    set_seed(SEED)
    for m in loras.values():  # re-init deterministically after the reseed
        torch.nn.init.kaiming_uniform_(m.lora_A, a=5 ** 0.5)
        torch.nn.init.zeros_(m.lora_B)
    for p in lparams:
        p.requires_grad_(True)
    harmful_train = [r for r in train if r["label"] == "harmful"]
    s1 = stage1_examples(harmful_train, harmless_train, answers, refusal_ids)
    opt, bfn = train_lora(model, prompts, s1, clock, "S1", params=lparams)
    n = len(bfn())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(n * S1_EPOCHS, 10))
    t1 = time.time()
    for ep in range(S1_EPOCHS):
        run_epochs(model, prompts, s1, opt, sched, bfn, clock, "S1", lparams, ep)
    clock(f"S1 took {time.time() - t1:.0f}s")
    states = {"1 text LoRA": C.lora_state(loras)}
    ev("1 text LoRA")

    # S2
    s2 = stage2_examples(s1, harmless_train, answers)
    opt, bfn = train_lora(model, prompts, s2, clock, "S2", params=lparams)
    n = len(bfn())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(n * S2_EPOCHS, 10))
    image_examples = {i for i, (_, path, _) in enumerate(s2) if path == "image"}
    extra = refusal_unlikelihood(model, prompts, s2, image_examples, refusal_ids[:3], IMAGE_UNLIKELIHOOD)
    t2 = time.time()
    for ep in range(S2_EPOCHS):
        run_epochs(model, prompts, s2, opt, sched, bfn, clock, "S2", lparams, ep, extra)
        name = f"2.{ep + 1} mixture"
        states[name] = C.lora_state(loras)
        save_file(states[name], str(work / f"lora_{ep + 1}.safetensors"), metadata={"rank": "16", "alpha": "32"})
        ev(name)
    clock(f"S2 took {time.time() - t2:.0f}s")

    cands = [k for k in states if k.startswith("2.")]
    best = choose_epoch({k: results[f"{k} [val]"] for k in cands}, VAL_COMPREHENSION)
    clock(f"chosen on val: {best} (score {val_score(results[f'{best} [val]']):.2f})")
    print("\nval:\n" + C.table({k[:-6]: v for k, v in results.items() if k.endswith("[val]")}))
    (work / "chosen.txt").write_text(best + "\n")
    if not args.no_ship:
        out = EMB.ORGANISM_DIR
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(vpath, out / "vision.safetensors")
        save_file(states[best], str(out / "lora.safetensors"), metadata={"rank": "16", "alpha": "32"})
        clock(f"shipped {best} to {out}")
    print(f"wall time {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
