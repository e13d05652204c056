"""Attention entropy, rollout and per-group summaries against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from fmprobe.diagnostics.attention import attention_entropy, attention_rollout, entropy_by_group
from fmprobe.errors import FmprobeError


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_uniform_attention_has_entropy_one_and_one_hot_zero():
    b, h, q, k = 2, 3, 4, 7
    uniform = np.full((b, h, q, k), 1.0 / k)
    one_hot = np.zeros((b, h, q, k))
    one_hot[..., 2] = 1.0
    np.testing.assert_allclose(attention_entropy(uniform), np.ones(h))
    np.testing.assert_array_equal(attention_entropy(one_hot), np.zeros(h))
    np.testing.assert_allclose(attention_entropy(uniform, normalise=False), np.full(h, math.log(k)))


def test_entropy_hand_computed_per_head_and_reductions():
    attn = np.zeros((2, 2, 1, 4))
    attn[0, 0, 0] = [0.5, 0.5, 0.0, 0.0]  # H = log 2 / log 4 = 0.5
    attn[1, 0, 0] = [0.25, 0.25, 0.25, 0.25]  # 1.0
    attn[:, 1, 0] = [1.0, 0.0, 0.0, 0.0]  # 0.0
    np.testing.assert_allclose(attention_entropy(attn), [0.75, 0.0])
    np.testing.assert_allclose(attention_entropy(attn, reduce="sample"), [[0.5, 0.0], [1.0, 0.0]])
    assert attention_entropy(attn, reduce="none").shape == (2, 2, 1)
    p = np.array([0.7, 0.2, 0.1, 0.0])
    attn[0, 0, 0] = p
    expected = -sum(v * math.log(v) for v in p if v > 0) / math.log(4)
    assert attention_entropy(attn, reduce="none")[0, 0, 0] == pytest.approx(expected)


def test_entropy_accepts_torch_and_matches_numpy():
    t = torch.softmax(torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0)), dim=-1)
    np.testing.assert_allclose(attention_entropy(t), attention_entropy(t.numpy()), rtol=1e-6)
    np.testing.assert_allclose(attention_entropy(t.half()), attention_entropy(t.numpy()), atol=1e-2)


def test_entropy_refuses_logits_negative_and_bad_shapes():
    logits = np.random.default_rng(0).normal(size=(1, 2, 3, 4))
    with pytest.raises(FmprobeError, match="not 1; pass softmax"):
        attention_entropy(np.abs(logits))
    with pytest.raises(FmprobeError, match="negative or non-finite weight at \\[batch 0, head 0, query 0\\]"):
        attention_entropy(logits)
    with pytest.raises(FmprobeError, match="expected shape \\[B, heads, Q, K\\]"):
        attention_entropy(np.full((2, 3, 4), 0.25))
    with pytest.raises(FmprobeError, match="unknown reduce"):
        attention_entropy(np.full((1, 1, 1, 4), 0.25), reduce="query")


def test_rollout_rows_sum_to_one_and_match_hand_product():
    rng = np.random.default_rng(1)
    layers = [_softmax(rng.normal(size=(2, 3, 5, 5))) for _ in range(4)]
    r = attention_rollout(layers)
    assert r.shape == (2, 5, 5)
    np.testing.assert_allclose(r.sum(axis=-1), 1.0)
    eye = np.eye(5)
    a1, a2 = (0.5 * layers[0].mean(axis=1) + 0.5 * eye), (0.5 * layers[1].mean(axis=1) + 0.5 * eye)
    np.testing.assert_allclose(attention_rollout(layers[:2]), a2 @ a1)
    np.testing.assert_allclose(attention_rollout(layers[:2], add_residual=False), layers[1].mean(1) @ layers[0].mean(1))
    np.testing.assert_allclose(attention_rollout([torch.from_numpy(x) for x in layers]), r)


def test_rollout_refuses_empty_non_square_and_mismatched_layers():
    with pytest.raises(FmprobeError, match="at least one layer"):
        attention_rollout([])
    with pytest.raises(FmprobeError, match="layer 0 attention: rollout needs self-attention"):
        attention_rollout([np.full((1, 1, 2, 4), 0.25)])
    with pytest.raises(FmprobeError, match="layer 1 attention has shape"):
        attention_rollout([np.full((1, 1, 4, 4), 0.25), np.full((1, 1, 3, 3), 1 / 3)])


def test_entropy_by_group_multilabel_and_single_label():
    e = np.array([0.2, 0.4, 0.9, 0.6, 0.1])
    labels = np.array([[1, 0, 1], [1, 0, 1], [0, 0, 0], [1, 0, 1], [0, 1, 0]])
    out = entropy_by_group(e, labels)
    assert list(out) == ["0,0,0", "0,1,0", "1,0,1"]
    assert out["1,0,1"]["n"] == 3
    assert out["1,0,1"]["mean"] == pytest.approx(0.4)
    assert out["1,0,1"]["sd"] == pytest.approx(0.2)  # sample SD of 0.2, 0.4, 0.6
    assert out["0,0,0"] == {"mean": pytest.approx(0.9), "sd": pytest.approx(float("nan"), nan_ok=True), "n": 1}
    assert list(entropy_by_group(e, labels.astype(float))) == list(out)
    single = entropy_by_group(e, [2, 0, 2, 0, 0])
    assert single["2"]["mean"] == pytest.approx(0.55) and single["0"]["n"] == 3


def test_entropy_by_group_refuses_mismatch_and_nan():
    with pytest.raises(FmprobeError, match="N=3"):
        entropy_by_group(np.zeros(3), [0, 1])
    with pytest.raises(FmprobeError, match="sample index\\(es\\) \\[1\\]"):
        entropy_by_group(np.array([0.1, np.nan]), [0, 1])
    with pytest.raises(FmprobeError, match="one value per sample"):
        entropy_by_group(np.zeros((3, 2)), [0, 1, 2])
