"""ONNX Runtime sessions and generation (CPU): greedy tokens identical to transformers'
``generate``, regap-seq's two passes, sampling, multimodal prompts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from onnx_exports import LAYERS, exported, left_padded_batch, multimodal_batch, tiny_llama  # noqa: E402

from regap_export.errors import RegapError  # noqa: E402
from regap_export.models.base import cache_of, with_cache  # noqa: E402
from regap_export.method.folding import sequence_strength  # noqa: E402
from regap_export.runtime import (  # noqa: E402
    OrtSessions, generate, merge_image_features, position_ids_from_mask,
)


def hf_generate(model, ids, mask, max_new_tokens=32, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    return out.numpy()


def torch_greedy(model, ids, mask, max_new_tokens, alpha=None) -> np.ndarray:
    """Greedy decoding with the model's own KV cache, never stopping at EOS."""
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    pos = torch.from_numpy(position_ids_from_mask(mask))
    extra = {} if alpha is None else {"regap_alpha": alpha}
    out_ids, cache, step_ids = ids_t, None, ids_t
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(input_ids=step_ids, attention_mask=mask_t, position_ids=pos, use_cache=True,
                        **with_cache(model, cache), **extra)
            cache = cache_of(out)
            step_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            out_ids = torch.cat([out_ids, step_ids], dim=1)
            mask_t = torch.cat([mask_t, torch.ones_like(step_ids)], dim=1)
            pos = pos[:, -1:] + 1
    return out_ids.numpy()


def test_open_reads_the_contract():
    sessions = OrtSessions.open(exported("regap").folder)
    assert not sessions.multimodal and not sessions.has_regap_alpha and not sessions.has_regap_score
    assert sessions.num_layers == LAYERS
    assert sessions.kv_dtype == np.float32
    past = sessions.empty_past(3)
    assert len(past) == 2 * LAYERS and past[0].shape == (3, 2, 0, 16)


def test_position_ids_follow_transformers():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(position_ids_from_mask(mask), [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]])


@pytest.mark.parametrize("kind", ["regap", "plain"])
def test_greedy_32_tokens_identical_to_transformers(kind):
    exp = exported(kind)
    sessions = OrtSessions.open(exp.folder)
    ids, mask = left_padded_batch(seed=21)
    result = generate(sessions, ids, mask, max_new_tokens=32)
    ref = hf_generate(exp.model, ids, mask, 32)
    assert result.sequences.shape == ref.shape
    np.testing.assert_array_equal(result.sequences, ref)
    assert result.regap_alpha is None and result.regap_score is None


def test_corrections_change_the_tokens():
    ids, mask = left_padded_batch(seed=21)
    a = generate(OrtSessions.open(exported("regap").folder), ids, mask, max_new_tokens=16).new_tokens
    b = generate(OrtSessions.open(exported("plain").folder), ids, mask, max_new_tokens=16).new_tokens
    assert (a != b).any()


def test_regap_seq_two_passes():
    exp = exported("seq")
    sessions = OrtSessions.open(exp.folder)
    assert sessions.has_regap_alpha and sessions.has_regap_score
    ids, mask = left_padded_batch(seed=23)
    result = generate(sessions, ids, mask, max_new_tokens=16)

    # pass 1 in torch: probe strength alpha0 on the whole band, z at the last prompt token
    captured = {}
    block = exp.adapter.decoder_layers(exp.model)[exp.readout.layer]
    hook = block.register_forward_hook(lambda m, a, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            exp.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                      position_ids=torch.from_numpy(position_ids_from_mask(mask)),
                      regap_alpha=torch.full((2,), exp.options.alpha0))
    finally:
        hook.remove()
    z = (captured["h"][:, -1].float() @ exp.readout.w + exp.readout.b)
    np.testing.assert_allclose(result.regap_score, z.numpy(), atol=1e-4)
    alpha = sequence_strength(z, exp.readout, exp.options).float()
    np.testing.assert_allclose(result.regap_alpha, alpha.numpy(), atol=1e-4)
    assert result.regap_alpha.dtype == np.float32 and result.regap_alpha.shape == (2,)

    # pass 2: generation with alpha(x) equals a torch greedy loop with the same alpha
    # (transformers' generate refuses unknown kwargs such as regap_alpha)
    result = generate(sessions, ids, mask, max_new_tokens=16, eos_token_id=[])
    ref = torch_greedy(exp.model, ids, mask, 16, alpha=torch.from_numpy(result.regap_alpha))
    np.testing.assert_array_equal(result.sequences, ref)


def test_sequence_alpha_is_the_sigmoid_formula_in_numpy():
    """The runtime's numpy strength (no torch) is alpha_max * sigmoid(kappa (z - tau)),
    also for scores far out where exp overflows."""
    from regap_export.method.folding import sequence_alpha
    from regap_export.options import RegapOptions

    options = RegapOptions(alpha_max=0.75, tau=0.3)
    z = np.array([-1e6, -40.0, -1.5, 0.0, 0.3, 2.25, 1e6])
    got = sequence_alpha(z, 2.5, options)
    expected = 0.75 * torch.sigmoid(2.5 * (torch.from_numpy(z) - 0.3)).numpy()
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    assert got[0] == 0.0 and got[-1] == 0.75 and got[4] == 0.375


def test_regap_seq_explicit_alpha_zero_is_the_unmodified_model():
    sessions = OrtSessions.open(exported("seq").folder)
    ids, mask = left_padded_batch(seed=25)
    result = generate(sessions, ids, mask, max_new_tokens=32, regap_alpha=0.0)
    assert result.regap_score is None
    np.testing.assert_array_equal(result.sequences, hf_generate(tiny_llama(), ids, mask, 32))


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    sessions = OrtSessions.open(exported("regap").folder)
    ids, mask = left_padded_batch(seed=27)
    a = generate(sessions, ids, mask, max_new_tokens=12, do_sample=True, temperature=1.3, top_p=0.9, seed=5)
    b = generate(sessions, ids, mask, max_new_tokens=12, do_sample=True, temperature=1.3, top_p=0.9, seed=5)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    greedy = generate(sessions, ids, mask, max_new_tokens=12)
    top1 = generate(sessions, ids, mask, max_new_tokens=12, do_sample=True, top_k=1, seed=9)
    np.testing.assert_array_equal(greedy.sequences, top1.sequences)


def test_eos_stops_and_pads():
    sessions = OrtSessions.open(exported("regap").folder)
    ids, mask = left_padded_batch(seed=21)
    free = generate(sessions, ids, mask, max_new_tokens=6, eos_token_id=[]).new_tokens
    eos = int(free[0, 1])  # row 0's second token plays EOS
    expected = free.copy()
    ends = []
    for row in range(2):
        hits = np.flatnonzero(free[row] == eos)
        end = int(hits[0]) + 1 if hits.size else 6
        expected[row, end:] = 0
        ends.append(end)
    expected = expected[:, :max(ends)]
    result = generate(sessions, ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(result.new_tokens, expected)


def test_errors():
    sessions = OrtSessions.open(exported("regap").folder)
    ids, mask = left_padded_batch()
    with pytest.raises(RegapError, match="left-padded"):
        generate(sessions, ids[:, ::-1].copy(), mask[:, ::-1].copy(), max_new_tokens=2)
    with pytest.raises(RegapError, match="regap_alpha"):
        generate(sessions, ids, mask, max_new_tokens=2, regap_alpha=1.0)
    with pytest.raises(RegapError, match="no image"):
        generate(sessions, ids, mask, max_new_tokens=2, pixel_values=np.zeros((1, 3, 4, 4), np.float32))
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RegapError, match="CUDA"):
            OrtSessions.open(exported("regap").folder, device="cuda")


def test_merge_image_features_checks_counts():
    embeds = np.zeros((1, 4, 2), np.float32)
    ids = np.array([[1, 9, 9, 2]])
    feats = np.arange(4, dtype=np.float32).reshape(1, 2, 2)
    out = merge_image_features(embeds, ids, feats, 9)
    np.testing.assert_array_equal(out[0, 1:3], [[0, 1], [2, 3]])
    with pytest.raises(RegapError, match="do not match"):
        merge_image_features(embeds, ids, feats[:, :1], 9)


@pytest.mark.parametrize("family", ["idefics3", "llava", "llava_next"])
def test_multimodal_greedy_identical_to_transformers(family):
    exp = exported(family)
    sessions = OrtSessions.open(exp.folder)
    assert sessions.multimodal
    enc = multimodal_batch(exp)
    ids, mask = enc["input_ids"].numpy(), enc["attention_mask"].numpy()
    pixels = {k: v.numpy() for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    result = generate(sessions, ids, mask, max_new_tokens=16, eos_token_id=[], **pixels)
    with torch.no_grad():
        ref = exp.model.generate(**enc, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                 pad_token_id=exp.model.config.get_text_config().pad_token_id)
    np.testing.assert_array_equal(result.sequences, ref.numpy())
