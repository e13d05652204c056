import pytest
import torch

from fmprobe.config import HeadConfig
from fmprobe.errors import ConfigError
from fmprobe.heads import build_head

D = 16


@pytest.mark.parametrize("head_type", ["linear", "mlp"])
@pytest.mark.parametrize("in_dim", [D, 2 * D])  # 2D: pooling cls+mean concatenates CLS and the patch mean
def test_pooled_heads_output_shape(head_type, in_dim):
    extra = {"hidden": 8} if head_type == "mlp" else {}
    head = build_head(HeadConfig(type=head_type, **extra), in_dim, 3)
    assert head(torch.randn(5, in_dim)).shape == (5, 3)
    with pytest.raises(ValueError, match="pooled features"):
        head(torch.randn(5, 4, in_dim))
    with pytest.raises(RuntimeError):  # the width the head was built for is the width it takes
        head(torch.randn(5, in_dim + 1))


@pytest.mark.parametrize("kwargs,out_dim", [({}, 4), ({"num_queries": 3}, 4), ({"query_per_class": True}, 4), ({}, 1)])
def test_attentive_shapes_and_attention(kwargs, out_dim):
    head = build_head(HeadConfig(type="attentive", pooling="attentive", num_heads=4, hidden=8, **kwargs), D, out_dim)
    tokens = torch.randn(2, 7, D)
    assert head(tokens).shape == (2, out_dim)
    n_queries = out_dim if kwargs.get("query_per_class") else kwargs.get("num_queries", 1)
    attn = head.last_attention
    assert attn.shape == (2, 4, n_queries, 7)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, n_queries))
    assert not attn.requires_grad
    with pytest.raises(ValueError, match="token features"):
        head(torch.randn(2, D))


def test_query_per_class_logits_are_per_query():
    """Each class logit depends only on its own query: perturbing query 1 leaves logit 0 unchanged."""
    head = build_head(HeadConfig(type="attentive", pooling="attentive", num_heads=2, query_per_class=True), D, 3)
    tokens = torch.randn(2, 5, D)
    before = head(tokens).detach()
    with torch.no_grad():
        head.queries[1] += 1.0
    after = head(tokens).detach()
    torch.testing.assert_close(after[:, 0], before[:, 0])
    torch.testing.assert_close(after[:, 2], before[:, 2])
    assert not torch.allclose(after[:, 1], before[:, 1])


def test_reset_parameters_redraws_weights():
    """reset_parameters re-draws the weights (the trainer relies on it for per-seed inits)."""
    head = build_head(HeadConfig(type="attentive", pooling="attentive", num_heads=2), D, 2)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    head.reset_parameters()
    changed = [k for k, v in head.state_dict().items() if not torch.equal(v, before[k])]
    assert {"queries", "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "readout.weight"} <= set(changed)


def test_bad_head_options_raise_naming_key():
    with pytest.raises(ConfigError, match="num_heads"):
        build_head(HeadConfig(type="linear", num_heads=4), D, 2)
    with pytest.raises(ConfigError, match="hidden"):
        build_head(HeadConfig(type="linear", hidden=32), D, 2)
    with pytest.raises(ConfigError, match="num_heads=3 must divide"):
        build_head(HeadConfig(type="attentive", pooling="attentive", num_heads=3), D, 2)
    with pytest.raises(ConfigError, match="num_queries"):
        build_head(HeadConfig(type="attentive", pooling="attentive", num_queries=2, query_per_class=True), D, 2)



def test_query_attention_equals_torch_multihead_attention():
    """The cheap evaluation order computes exactly nn.MultiheadAttention's function."""
    import torch
    from torch import nn

    from fmprobe.heads.attentive import QueryAttention

    torch.manual_seed(0)
    dim, heads = 24, 4
    fast = QueryAttention(dim, heads)
    fast.reset_parameters()
    with torch.no_grad():
        for proj in (fast.k_proj, fast.q_proj, fast.v_proj):
            proj.bias.normal_()
    ref = nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([fast.q_proj.weight, fast.k_proj.weight, fast.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([fast.q_proj.bias, fast.k_proj.bias, fast.v_proj.bias]))
        ref.out_proj.weight.copy_(fast.out_proj.weight)
        ref.out_proj.bias.copy_(fast.out_proj.bias)
    queries, tokens = torch.randn(3, dim), torch.randn(5, 17, dim)
    out, weights = fast(queries, tokens)
    want, want_w = ref(queries.expand(5, -1, -1), tokens, tokens, average_attn_weights=False)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, want_w, atol=1e-6, rtol=1e-5)


def test_attentive_head_attends_over_layer_normed_tokens_with_the_affine_folded_in():
    """The head's function is nn.MultiheadAttention over LayerNorm(tokens) (any affine), while training on cached
    tokens builds no backward pass over the [B, N, D] tokens: the only LayerNorm in the graph is the MLP's."""
    import torch
    from torch import nn

    from fmprobe.heads.attentive import AttentiveHead

    torch.manual_seed(0)
    dim, heads = 24, 4
    head = AttentiveHead(dim, 3, num_heads=heads, num_queries=2, query_per_class=False, hidden=16)
    with torch.no_grad():
        head.norm_tokens.weight.uniform_(0.5, 2.0)
        head.norm_tokens.bias.normal_()
        head.attn.k_proj.bias.normal_()
    ref = nn.MultiheadAttention(dim, heads, batch_first=True)
    attn = head.attn
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        ref.out_proj.weight.copy_(attn.out_proj.weight)
        ref.out_proj.bias.copy_(attn.out_proj.bias)
    tokens = torch.randn(5, 17, dim) * 3 + 1
    out = head(tokens)
    normed = head.norm_tokens(tokens)
    attended, weights = ref(head.queries.expand(5, -1, -1), normed, normed, average_attn_weights=False)
    x = head.queries + attended
    x = x + head.mlp(head.norm_mlp(x))
    torch.testing.assert_close(out, head.readout(x.flatten(1)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.last_attention, weights, atol=1e-6, rtol=1e-5)

    norms, todo, seen = 0, [out.sum().grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        norms += "LayerNorm" in type(node).__name__
        todo += [child for child, _ in node.next_functions]
    assert norms == 1
