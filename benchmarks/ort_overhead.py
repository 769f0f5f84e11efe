"""Cost of the correction layers inside ONNX Runtime: uncorrected vs fixed vs regap graphs.

    python benchmarks/ort_overhead.py                                  # CPU-sized random Llama
    python benchmarks/ort_overhead.py --device cuda --shape tinyllama  # the reference shape (GPU)
    python benchmarks/ort_overhead.py --device cuda --shape tinyllama --dtype fp16

One seeded random-weight Llama is exported by regap-export's own exporter
(``export_text_decoder``) three times:

- ``uncorrected``: no correction layers;
- ``fixed``: the middle half of the blocks (L/4 .. 3L/4 - 1; 8 of 16 for ``tinyllama``)
  corrected by a constant add (``h + v``, 1 op);
- ``regap``: the same blocks with the folded gated correction (``h + sigmoid(h.w + b) v``,
  5 ops in fp32, 7 in fp16), random w/b/v scaled so that the gates of real block outputs
  lie in about 0.2-0.8 (checked and reported).

(a) Timing: ONNX Runtime with IO binding (inputs, KV cache and preallocated outputs live on
the device; ``synchronize_outputs`` after every run), a prefill of ``--prefill`` tokens and
one decode step after ``--past`` tokens of cache, for each batch in ``--batches``. Every
repetition runs the variants in a freshly shuffled order. Reported: medians, p10-p90, the
ratio of medians to ``uncorrected`` and a paired bootstrap 95 % CI of that ratio
(repetitions resampled together, so slow drifts of the machine cancel).

(b) Profiler: a separate session per variant with ``enable_profiling``; the kernel time of
the correction nodes (by node name, from ``onnx_graph.correction_chains``) as a share of all
kernel time, per case, warm-up runs excluded. On CUDA the per-node times ONNX Runtime
records are host-side launch times unless the wheel was built with CUDA profiling: read
them as a proxy there.

(c) Fusions: the ORT_ENABLE_ALL-optimized graph of each variant
(``SessionOptions.optimized_model_filepath``), op counts compared with ``uncorrected``;
any fused op type (SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization,
RotaryEmbedding, GroupQueryAttention, MatMulNBits, ...) that the corrected graph has fewer
of is reported as a lost fusion.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import emit, environment, median_and_spread, paired_bootstrap, peak_rss_mib  # noqa: E402
from _synthetic import SHAPES, block_outputs, gated_constants, random_llama  # noqa: E402

VARIANTS = ("uncorrected", "fixed", "regap")
FUSED_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
             "SkipLayerNormalization", "RotaryEmbedding", "GroupQueryAttention", "MultiHeadAttention",
             "Attention", "MatMulNBits", "FusedMatMul", "Gemm", "FastGelu", "BiasGelu", "QuickGelu",
             "SkipGroupNorm", "GemmaRotaryEmbedding", "SparseAttention", "FusedConv", "BiasSoftmax")


# --------------------------------------------------------------------------------------
# building and exporting
# --------------------------------------------------------------------------------------
def corrected_layers(num_layers: int, spec: str | None) -> list[int]:
    if spec:
        start, end = (int(x) for x in spec.split(":"))
        return list(range(start, end))
    return list(range(num_layers // 4, (3 * num_layers) // 4))


def make_corrections(model, adapter, layers: list[int], seed: int):
    """LayerCorrection lists for the fixed and regap variants (same layers, same v)."""
    from regap_export.method.folding import FIXED, GATED, LayerCorrection

    hs = block_outputs(model, adapter, tokens=64, batch=2, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    fixed, gated, gates = [], [], {}
    for layer in layers:
        w, b, v, g = gated_constants(hs[layer], gen)
        fixed.append(LayerCorrection(layer, FIXED, v))
        gated.append(LayerCorrection(layer, GATED, v, w, b))
        gates[layer] = g
    allg = torch.cat(list(gates.values()))
    gate_stats = {"min": float(allg.min()), "p10": float(torch.quantile(allg, 0.1)),
                  "median": float(allg.median()), "p90": float(torch.quantile(allg, 0.9)),
                  "max": float(allg.max()),
                  "share_in_0.2_0.8": float(((allg >= 0.2) & (allg <= 0.8)).double().mean())}
    return {"uncorrected": [], "fixed": fixed, "regap": gated}, gate_stats


def export_variants(model, adapter, corrections: dict, workdir: Path, dtype: torch.dtype,
                    variants: list[str], external_data: bool | None = None) -> dict[str, dict[str, Any]]:
    from regap_export.export.onnx_export import export_text_decoder
    from regap_export.export.onnx_graph import correction_nodes
    from regap_export.method.rewrite import insert_corrections, remove_corrections

    out = {}
    for name in variants:
        folder = workdir / name
        start = time.perf_counter()
        if corrections[name]:
            insert_corrections(model, adapter, corrections[name])
        try:
            path = export_text_decoder(model, adapter, folder, dtype=dtype, external_data=external_data)
        finally:
            remove_corrections(model, adapter)
        seconds = time.perf_counter() - start
        ops = correction_nodes(path)
        out[name] = {"path": path, "export_seconds": seconds, "correction_ops": ops,
                     "bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file())}
        print(f"exported {name}: {seconds:.1f} s, {out[name]['bytes'] / 2**20:.0f} MiB, "
              f"ops per corrected layer: {sorted(set(tuple(v) for v in ops.values())) or '-'}", flush=True)
    return out


def derive_variants(regap_path: Path) -> dict[str, dict[str, Any]]:
    """``uncorrected`` and ``fixed`` graphs cut out of the exported ``regap`` graph.

    Each gated chain ([Cast] MatMul Add Sigmoid Mul(m) Mul(v) Add [Cast]) is removed and its
    output rewired to the block output h (uncorrected) or replaced by ``Add(h, Mul(m, v))``
    with v (and, in half precision, m) in the model's dtype (fixed), m being the shared
    image mask, with the nodes left dead dropped: the graphs the exporter writes for those
    modes (``--derive-check`` compares them: the fixed graphs have the exporter's op counts;
    the exporter's own uncorrected graph has 18 more shape-only ops on a tiny Llama, and the
    same logits). The derived graphs sit next to the regap graph
    and share its external weight file, so one export serves all three variants.
    """
    import onnx
    from onnx import numpy_helper

    from regap_export.export.onnx_graph import correction_chains, correction_values

    regap_path = Path(regap_path)
    base = onnx.load(str(regap_path), load_external_data=False)
    values = correction_values(regap_path)
    out = {}
    for variant in ("uncorrected", "fixed"):
        start = time.perf_counter()
        proto = onnx.ModelProto()
        proto.CopyFrom(base)
        graph = proto.graph
        chains = correction_chains(proto)
        drop_nodes, drop_inits, add_inits, replace_at, rename = set(), set(), [], {}, {}
        model_dtype = None
        mask_cast = None  # half precision: the exporter casts the shared mask once, for every layer
        for layer, chain in chains.items():
            core = [n for n in chain if n.op_type != "Cast"]
            if [n.op_type for n in core] != ["MatMul", "Add", "Sigmoid", "Mul", "Mul", "Add"]:
                raise RuntimeError(f"layer {layer}: not a gated chain: {[n.op_type for n in chain]}")
            sigmoid, mask_mul = core[2], core[3]
            mask = next(i for i in mask_mul.input if i != sigmoid.output[0])
            h = chain[0].input[0]  # the Cast's input in fp16, the MatMul's in fp32
            tail = chain[-1].output[0]
            inside = {o for n in chain for o in n.output}
            ids = {id(n) for n in chain}
            for node in graph.node:  # only the tail may leave the chain
                if id(node) not in ids and any(i in inside and i != tail for i in node.input):
                    raise RuntimeError(f"layer {layer}: {node.op_type} {node.name} reads inside the correction")
            drop_nodes.update(id(n) for n in chain)
            drop_inits.update(f"regap.{layer}.{k}" for k in ("w", "b", "v"))
            if variant == "uncorrected":
                rename[tail] = h
            else:
                v = values[layer]["v"].reshape(-1)
                if model_dtype is None:
                    model_dtype = np.float16 if chain[0].op_type == "Cast" else np.float32
                name = f"regap.{layer}.v"
                add_inits.append(numpy_helper.from_array(v.astype(model_dtype), name))
                if model_dtype != np.float32 and mask_cast is None:
                    mask_cast = onnx.helper.make_node("Cast", [mask], [f"{mask}_float16"], name=f"{mask}_float16",
                                                      to=onnx.TensorProto.FLOAT16)
                scale = mask if mask_cast is None else mask_cast.output[0]
                replace_at[id(chain[0])] = fixed_nodes(layer, h, scale, name, tail)
        produced = {o for n in graph.node for o in n.output}
        nodes = [] if mask_cast is None or mask_cast.input[0] in produced else [mask_cast]
        for node in graph.node:
            if id(node) in replace_at:
                nodes.extend(replace_at[id(node)])
            elif id(node) not in drop_nodes:
                new = onnx.NodeProto()
                new.CopyFrom(node)
                for i, name in enumerate(new.input):
                    if name in rename:
                        new.input[i] = rename[name]
                nodes.append(new)
            if mask_cast is not None and mask_cast.input[0] in node.output:
                nodes.append(mask_cast)  # right after the mask it casts
        del graph.node[:]
        graph.node.extend(without_dead_nodes(nodes, {o.name for o in graph.output}))
        for value in graph.output:
            if value.name in rename:
                raise RuntimeError(f"a correction output is a graph output ({value.name})")
        kept = [init for init in graph.initializer if init.name not in drop_inits]
        del graph.initializer[:]
        graph.initializer.extend(kept + add_inits)
        path = regap_path.with_name(f"model_{variant}.onnx")
        onnx.save(proto, str(path))
        out[variant] = {"path": path, "export_seconds": time.perf_counter() - start, "derived": True,
                        "correction_ops": correction_nodes_of(path), "bytes": path.stat().st_size}
        print(f"derived {variant} from the regap graph ({out[variant]['export_seconds']:.1f} s)", flush=True)
    return out


def fixed_nodes(layer: int, h: str, mask: str, v: str, out: str) -> list:
    """h + m * v (m and v in the model's dtype), as the exporter writes a fixed correction."""
    import onnx

    scaled = f"regap_fixed_mul_{layer}"
    return [onnx.helper.make_node("Mul", [mask, v], [scaled], name=scaled),
            onnx.helper.make_node("Add", [h, scaled], [out], name=f"regap_fixed_add_{layer}")]


def without_dead_nodes(nodes: list, outputs: set[str]) -> list:
    """``nodes`` less those whose outputs nothing reads (the mask's Unsqueeze once no
    correction uses it), repeated until none is left."""
    while True:
        read = outputs | {i for n in nodes for i in n.input}
        live = [n for n in nodes if any(o in read for o in n.output)]
        if len(live) == len(nodes):
            return live
        nodes = live


def correction_nodes_of(path: Path) -> dict[int, list[str]]:
    from regap_export.export.onnx_graph import correction_nodes

    return correction_nodes(path)


def derive_check(exports: dict, derived: dict, device: str, threads: int | None, np_dtype) -> dict[str, Any]:
    """Derived vs exported graphs: op counts and outputs on one small prefill."""
    import onnx

    report = {}
    info = json.loads((Path(exports["uncorrected"]["path"]).parent / "regap_onnx.json").read_text())
    case = Case("prefill", 2, 8, 0, info, device, np_dtype, 123)
    for variant in ("uncorrected", "fixed"):
        counts = {}
        outs = {}
        for kind, path in (("exported", exports[variant]["path"]), ("derived", derived[variant]["path"])):
            proto = onnx.load(str(path), load_external_data=False)
            counts[kind] = collections.Counter(n.op_type for n in proto.graph.node)
            sess = open_session(path, device, session_options(threads))
            binding = case.bind(sess)
            run_once(sess, binding)
            outs[kind] = binding.get_outputs()[0].numpy().astype(np.float32)
            del sess
        diff = float(np.abs(outs["exported"] - outs["derived"]).max())
        report[variant] = {"same_op_counts": counts["exported"] == counts["derived"],
                           "op_count_diff": {k: counts["derived"][k] - counts["exported"][k]
                                             for k in set(counts["derived"]) | set(counts["exported"])
                                             if counts["derived"][k] != counts["exported"][k]},
                           "max_abs_logit_diff": diff}
        print(f"derive check {variant}: same op counts {report[variant]['same_op_counts']}, "
              f"max |logit diff| {diff:.3g}", flush=True)
    return report


# --------------------------------------------------------------------------------------
# ONNX Runtime
# --------------------------------------------------------------------------------------
def providers_for(device: str) -> list:
    import onnxruntime as ort

    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SystemExit(f"error: this onnxruntime ({ort.__version__}, {ort.__file__}) has no "
                             f"CUDAExecutionProvider; providers: {ort.get_available_providers()}")
        return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(threads: int | None, *, profile_prefix: Path | None = None,
                    optimized_path: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
        # Graphs over 2 GB cannot be one protobuf: write the optimized weights next to it.
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    optimized_path.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return so


def open_session(path: Path, device: str, so):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), sess_options=so, providers=providers_for(device))
    if device == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
        raise SystemExit(f"error: {path}: ONNX Runtime did not start the CUDA provider ({sess.get_providers()})")
    return sess


class Case:
    """One input configuration (prefill or decode, batch), bound once per variant."""

    def __init__(self, phase: str, batch: int, seq: int, past: int, info: dict, device: str, np_dtype, seed: int):
        import onnxruntime as ort

        self.phase, self.batch, self.seq, self.past = phase, batch, seq, past
        self.name = f"{phase} b{batch} " + (f"s{seq}" if phase == "prefill" else f"past{past}")
        rng = np.random.default_rng(seed)
        total = past + seq
        L, kv, hd, vocab = info["num_layers"], info["num_key_value_heads"], info["head_dim"], info["vocab_size"]
        feeds = {
            "input_ids": rng.integers(3, vocab, size=(batch, seq), dtype=np.int64),
            "attention_mask": np.ones((batch, total), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(past, total, dtype=np.int64), (batch, seq)).copy(),
        }
        for i in range(L):
            for part in ("key", "value"):
                feeds[f"past_key_values.{i}.{part}"] = (0.5 * rng.standard_normal((batch, kv[i], past, hd[i]))
                                                       ).astype(np_dtype)
        dev = "cuda" if device == "cuda" else "cpu"
        self.inputs = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), dev, 0) for k, v in feeds.items()}
        self.outputs = {"logits": ort.OrtValue.ortvalue_from_shape_and_type([batch, seq, vocab], np_dtype, dev, 0)}
        for i in range(L):
            for part in ("key", "value"):
                self.outputs[f"present.{i}.{part}"] = ort.OrtValue.ortvalue_from_shape_and_type(
                    [batch, kv[i], total, hd[i]], np_dtype, dev, 0)
        self.tokens = batch * seq

    def bind(self, sess):
        binding = sess.io_binding()
        for name, value in self.inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in self.outputs.items():
            binding.bind_ortvalue_output(name, value)
        return binding


def run_once(sess, binding) -> float:
    start = time.perf_counter()
    sess.run_with_iobinding(binding)
    binding.synchronize_outputs()
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------
# profiler
# --------------------------------------------------------------------------------------
def correction_node_names(path: Path) -> dict[str, str]:
    from regap_export.export.onnx_graph import correction_chains

    names = {}
    for layer, chain in correction_chains(path).items():
        for node in chain:
            names[node.name] = f"{layer}:{node.op_type}"
    return names


def parse_profile(profile_file: str, run_case: list[str | None], corr_names: dict[str, str]) -> dict[str, Any]:
    """Kernel time per case (warm-up runs, marked None in ``run_case``, dropped)."""
    events = json.loads(Path(profile_file).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    if len(runs) != len(run_case):
        raise RuntimeError(f"profile has {len(runs)} model_run events, expected {len(run_case)}")
    starts = np.array([r["ts"] for r in runs])
    ends = np.array([r["ts"] + r["dur"] for r in runs])
    per_case: dict[str, dict[str, Any]] = {}
    seen = set()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i < 0 or e["ts"] > ends[i] or run_case[i] is None:
            continue
        node = e["name"][: -len("_kernel_time")]
        c = per_case.setdefault(run_case[i], {"total_us": 0, "correction_us": 0, "runs": set(),
                                                "by_op": collections.Counter()})
        c["total_us"] += e["dur"]
        c["runs"].add(i)
        if node in corr_names:
            c["correction_us"] += e["dur"]
            c["by_op"][e["args"].get("op_name", "?")] += e["dur"]
            seen.add(node)
    out = {}
    for case, c in per_case.items():
        n = max(1, len(c["runs"]))
        out[case] = {"kernel_ms_per_run": c["total_us"] / n / 1000,
                     "correction_ms_per_run": c["correction_us"] / n / 1000,
                     "correction_share": c["correction_us"] / c["total_us"] if c["total_us"] else 0.0,
                     "correction_us_by_op": {k: v / n for k, v in c["by_op"].items()}}
    missing = sorted(set(corr_names) - seen)
    return {"cases": out, "correction_nodes": len(corr_names), "correction_nodes_seen": len(seen),
            "correction_nodes_not_seen": [f"{n} ({corr_names[n]})" for n in missing][:40]}


def op_counts(path: Path) -> collections.Counter:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    counts = collections.Counter()
    for node in proto.graph.node:
        counts[(f"{node.domain}." if node.domain and node.domain != "ai.onnx" else "") + node.op_type] += 1
    return counts


def fusion_report(counts: dict[str, collections.Counter], corrected_layers: int) -> dict[str, Any]:
    base = counts.get("uncorrected")
    out: dict[str, Any] = {}
    if base is None:
        return out
    for name, c in counts.items():
        if name == "uncorrected":
            continue
        diff = {op: c[op] - base[op] for op in set(c) | set(base) if c[op] != base[op]}
        lost = {op: d for op, d in diff.items()
                if d < 0 and (op.split(".")[-1] in FUSED_OPS or op.startswith("com.microsoft."))}
        out[name] = {"diff_vs_uncorrected": dict(sorted(diff.items())), "fusions_lost": lost}
    out["uncorrected_fused_ops"] = {op: n for op, n in sorted(base.items())
                                    if op.split(".")[-1] in FUSED_OPS or op.startswith("com.microsoft.")}
    out["corrected_layers"] = corrected_layers
    return out


def prepare_exports(args, shape: dict, workdir: Path, torch_dtype, threads, np_dtype) -> dict[str, Any]:
    """Build the random model and export the variants into ``workdir`` (or, with --reuse,
    read back what an earlier --export-only run left there). Returns the state saved in
    ``workdir/exports.json``."""
    state_file = workdir / "exports.json"
    layers = corrected_layers(shape["layers"], args.corrected)
    derive = bool(args.derive or args.derive_check)
    want = {"config": shape, "dtype": args.dtype, "corrected_layers": layers, "seed": args.seed, "derive": derive}
    if args.reuse and state_file.is_file():
        state = json.loads(state_file.read_text())
        if {k: state.get(k) for k in want} != want:
            raise SystemExit(f"error: {state_file} was written for {({k: state.get(k) for k in want})}, "
                             f"this run wants {want}")
        print(f"reusing the graphs in {workdir} (exported in {state['exports']['regap']['export_seconds']:.0f} s)",
              flush=True)
        return state
    if args.reuse:
        print(f"note: --reuse, but {state_file} is missing: exporting now", flush=True)

    from regap_export.models import adapter_for_model

    t0 = time.perf_counter()
    model = random_llama(**shape, max_positions=max(2048, args.past + args.prefill + 8), seed=args.seed)
    adapter = adapter_for_model(model)
    corrections, gate_stats = make_corrections(model, adapter, layers, args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"random Llama {shape}: {params / 1e6:.0f} M parameters, built in {time.perf_counter() - t0:.1f} s; "
          f"corrected blocks {layers[0]}..{layers[-1]} ({len(layers)} of {shape['layers']}); "
          f"gates on random tokens: {gate_stats}", flush=True)
    derive_report = None
    ext = True if args.external_data else None
    if derive:
        exports = export_variants(model, adapter, corrections, workdir, torch_dtype, ["regap"], ext)
        exports.update(derive_variants(exports["regap"]["path"]))
        if args.derive_check:
            exported = export_variants(model, adapter, corrections, workdir, torch_dtype, ["uncorrected", "fixed"],
                                       ext)
            derive_report = derive_check(exported, exports, args.device, threads, np_dtype)
    else:
        exports = export_variants(model, adapter, corrections, workdir, torch_dtype, list(VARIANTS), ext)
    del model
    state = dict(want, gate_stats=gate_stats, parameters=params, derive_check=derive_report,
                 exports={v: dict(e, path=str(e["path"])) for v, e in exports.items()})
    state_file.write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
    return state


# --------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu",
                        help="model preset (cpu: 512/1408/8 layers; tinyllama: 2048/5632/16 layers)")
    for flag in ("hidden", "intermediate", "layers", "heads", "kv-heads", "vocab"):
        parser.add_argument(f"--{flag}", type=int, default=None, help=f"override the preset's {flag}")
    parser.add_argument("--corrected", default=None, help="START:END blocks to correct (default: the middle half)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                        help="fp16 graphs are meant for --device cuda (ORT CPU has few fp16 kernels)")
    parser.add_argument("--prefill", type=int, default=512, help="prefill tokens")
    parser.add_argument("--past", type=int, default=1024, help="cache length before the decode step")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (prefill and decode)")
    parser.add_argument("--prefill-batches", default=None, help="batch sizes for the prefill only (default: --batches)")
    parser.add_argument("--decode-batches", default=None, help="batch sizes for the decode step only (default: --batches)")
    parser.add_argument("--repeats", type=int, default=60, help="timed repetitions per case and variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all cores)")
    parser.add_argument("--profile-runs", type=int, default=5, help="profiled runs per case (0: skip the profiler)")
    parser.add_argument("--no-fusions", action="store_true", help="skip saving/comparing the optimized graphs")
    parser.add_argument("--derive", action="store_true",
                        help="export only the regap graph and cut the uncorrected and fixed graphs out of it "
                             "(one export instead of three: for tight GPU budgets)")
    parser.add_argument("--derive-check", action="store_true",
                        help="--derive, and also export the other two and compare (op counts, logits)")
    parser.add_argument("--export-only", action="store_true",
                        help="build and export into --workdir, then stop (time them later with --reuse)")
    parser.add_argument("--reuse", action="store_true",
                        help="time the graphs an earlier --export-only run left in --workdir")
    parser.add_argument("--external-data", action="store_true",
                        help="force ONNX external data (automatic above 64 MiB of weights)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the graphs here (default: a temp folder)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON result here")
    args = parser.parse_args()

    shape = dict(SHAPES[args.shape])
    for key in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    prefill_batches = [int(b) for b in (args.prefill_batches or args.batches).split(",") if b.strip()]
    decode_batches = [int(b) for b in (args.decode_batches or args.batches).split(",") if b.strip()]
    if args.dtype == "fp16" and args.device == "cpu":
        print("warning: fp16 on ONNX Runtime's CPU provider is for smoke tests only (few fp16 CPU kernels)",
              flush=True)
    if args.device == "cuda":
        providers_for("cuda")  # fail before the long export
    threads = args.threads if args.threads is not None else (os.cpu_count() if args.device == "cpu" else None)
    torch_dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    np_dtype = np.float16 if args.dtype == "fp16" else np.float32

    if args.export_only and args.workdir is None:
        raise SystemExit("error: --export-only needs --workdir (where the graphs are kept)")
    cleanup = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="ort_overhead_")) if cleanup else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        state = prepare_exports(args, shape, workdir, torch_dtype, threads, np_dtype)
        if args.export_only:
            print(f"graphs written to {workdir} (run again with --reuse --workdir {workdir} to time them)")
            return
        exports = {v: dict(e, path=Path(e["path"])) for v, e in state["exports"].items()}
        layers, gate_stats, params = state["corrected_layers"], state["gate_stats"], state["parameters"]
        derive_report = state.get("derive_check")
        info = json.loads((workdir / "regap" / "regap_onnx.json").read_text())

        # (a) timing -------------------------------------------------------------------
        sessions = {v: open_session(exports[v]["path"], args.device, session_options(threads)) for v in VARIANTS}
        cases = []
        for b in prefill_batches:
            cases.append(Case("prefill", b, args.prefill, 0, info, args.device, np_dtype, args.seed + b))
        for b in decode_batches:
            cases.append(Case("decode", b, 1, args.past, info, args.device, np_dtype, args.seed + 100 + b))
        bindings = {(c.name, v): c.bind(sessions[v]) for c in cases for v in VARIANTS}
        for c in cases:
            for v in VARIANTS:
                for _ in range(args.warmup):
                    run_once(sessions[v], bindings[(c.name, v)])
        times = {(c.name, v): [] for c in cases for v in VARIANTS}
        order_rng = random.Random(args.seed)
        t_loop = time.perf_counter()
        for rep in range(args.repeats):
            for c in cases:
                order = list(VARIANTS)
                order_rng.shuffle(order)
                for v in order:
                    times[(c.name, v)].append(run_once(sessions[v], bindings[(c.name, v)]))
        loop_seconds = time.perf_counter() - t_loop
        del bindings, sessions

        timing: dict[str, Any] = {}
        rows = []
        for c in cases:
            base = np.array(times[(c.name, "uncorrected")])
            timing[c.name] = {}
            for v in VARIANTS:
                arr = np.array(times[(c.name, v)])
                s = median_and_spread(list(arr * 1000))
                ratio = float(np.median(arr) / np.median(base))
                ci = paired_bootstrap(base, arr, args.bootstrap, args.seed) if v != "uncorrected" else (1.0, 1.0)
                timing[c.name][v] = {"ms": s, "ratio": ratio, "ratio_ci95": ci,
                                     "tokens_per_second": c.tokens / float(np.median(arr))}
                rows.append((c.name, v, f"{s['median']:.2f}", f"{s['p10']:.2f}-{s['p90']:.2f}",
                             f"{ratio:.3f}x", "-" if v == "uncorrected" else f"{ci[0]:.3f}-{ci[1]:.3f}"))

        # (b) profiler and (c) fusions: one analysis session per variant ------------------
        profile: dict[str, Any] = {}
        counts: dict[str, collections.Counter] = {}
        analysis_errors: dict[str, str] = {}
        if args.profile_runs > 0 or not args.no_fusions:
            optdir = workdir / "optimized"
            optdir.mkdir(exist_ok=True)
            for v in VARIANTS:
                try:
                    so = session_options(threads, profile_prefix=workdir / f"profile_{v}" if args.profile_runs else None,
                                         optimized_path=None if args.no_fusions else optdir / f"{v}.onnx")
                    sess = open_session(exports[v]["path"], args.device, so)
                    if args.profile_runs > 0:
                        run_case: list[str | None] = []
                        for c in cases:
                            binding = c.bind(sess)
                            run_once(sess, binding)
                            run_case.append(None)
                            for _ in range(args.profile_runs):
                                run_once(sess, binding)
                                run_case.append(c.name)
                        profile_file = sess.end_profiling()
                        profile[v] = parse_profile(profile_file, run_case, correction_node_names(exports[v]["path"])
                                                   if v != "uncorrected" else {})
                        Path(profile_file).unlink(missing_ok=True)
                    del sess
                    if not args.no_fusions:
                        counts[v] = op_counts(optdir / f"{v}.onnx")
                except Exception as exc:  # keep the timing results whatever the profiler does
                    analysis_errors[v] = f"{type(exc).__name__}: {str(exc)[:500]}"
                    print(f"warning: profiler/fusion analysis of {v} failed: {analysis_errors[v]}", flush=True)
            if not args.no_fusions:
                shutil.rmtree(optdir, ignore_errors=True)
        fusions = fusion_report(counts, len(layers)) if counts else {}

        results = {
            "device": args.device, "dtype": args.dtype, "shape": args.shape, "config": shape,
            "parameters": params, "corrected_layers": layers, "gates_on_random_tokens": gate_stats,
            "prefill_tokens": args.prefill, "past_tokens": args.past,
            "prefill_batches": prefill_batches, "decode_batches": decode_batches,
            "repeats": args.repeats, "warmup": args.warmup, "ort_threads": threads,
            "loop_seconds": loop_seconds, "timing": timing,
            "variants_from": "derived from the regap export" if state["derive"] else
                             "three exports", "derive_check": derive_report,
            "exports": {v: {"export_seconds": e["export_seconds"], "bytes": e["bytes"],
                            "ops_per_corrected_layer": sorted({" ".join(x) for x in e["correction_ops"].values()})}
                        for v, e in exports.items()},
            "profile": profile, "fusions": fusions, "analysis_errors": analysis_errors,
            "op_counts_optimized": {v: dict(sorted(c.items())) for v, c in counts.items()},
            "load_average": os.getloadavg(), "peak_rss_mib": peak_rss_mib(),
        }
        emit(f"ort_overhead ({args.device}, {args.dtype}, {args.shape})", results, rows,
             ("case", "variant", "median ms", "p10-p90 ms", "vs uncorrected", "ratio 95% CI"))
        if profile:
            print("profiler: correction kernels as a share of all kernel time")
            for v in ("fixed", "regap"):
                for case, p in profile.get(v, {}).get("cases", {}).items():
                    print(f"  {v:6s} {case:22s} {100 * p['correction_share']:6.2f} %  "
                          f"({p['correction_ms_per_run']:.3f} of {p['kernel_ms_per_run']:.2f} ms per run)")
                pv = profile.get(v, {})
                print(f"  {v:6s} correction nodes seen in the profile: {pv.get('correction_nodes_seen')} of "
                      f"{pv.get('correction_nodes')}")
        if fusions:
            print("fusions (ORT_ENABLE_ALL optimized graphs, op counts vs uncorrected):")
            print(f"  uncorrected fused ops: {fusions['uncorrected_fused_ops']}")
            for v in ("fixed", "regap"):
                f = fusions.get(v, {})
                print(f"  {v:6s} diff {f.get('diff_vs_uncorrected')}  lost: {f.get('fusions_lost') or 'none'}")
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps({"benchmark": "ort_overhead", "environment": environment(),
                                                 **results}, indent=2, sort_keys=True, default=str))
    finally:
        if cleanup:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
