"""The twin's decode kernels compute what transformers' own eager path computes: grouped
attention up to float rounding, the growing KV cache and the chunked unembedding bit for bit."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.cache_utils import DynamicCache
from transformers.models.llama.modeling_llama import LlamaAttention, eager_attention_forward

from steerkit import decode_kernels as dk
from steerkit.generate import Sampling, as_messages, generate, make_rows
from steerkit.models import wrap_model
from steerkit.testing import tiny_hf_model, tiny_model, tiny_tokenizer


def _attn_module(heads: int, kv: int) -> torch.nn.Module:
    cfg = LlamaConfig(hidden_size=16 * heads, num_attention_heads=heads, num_key_value_heads=kv, attn_implementation="eager")
    return LlamaAttention(cfg, 0).eval()


def _padding_mask(B: int, q: int, T: int) -> torch.Tensor:
    """An eager-style additive mask: causal, and row 0 left-padded by 3."""
    m = torch.zeros(B, 1, q, T)
    causal = torch.ones(q, T, dtype=torch.bool).tril(T - q)
    m.masked_fill_(~causal, torch.finfo(torch.float32).min)
    m[0, :, :, :3] = torch.finfo(torch.float32).min
    return m


@pytest.mark.parametrize("heads,kv", [(4, 2), (6, 2), (4, 4), (9, 3)])
@pytest.mark.parametrize("q", [1, 5])
@pytest.mark.parametrize("masked", [True, False])
def test_grouped_attention_equals_eager(heads, kv, q, masked):
    mod = _attn_module(heads, kv)
    g = torch.Generator().manual_seed(heads * 10 + q)
    B, T, d = 3, 7, 16
    query = torch.randn(B, q, heads, d, generator=g).transpose(1, 2)  # non-contiguous, as the model makes it
    key, value = torch.randn(B, kv, T, d, generator=g), torch.randn(B, kv, T, d, generator=g)
    mask = _padding_mask(B, q, T) if masked else None
    want, want_w = eager_attention_forward(mod, query, key, value, mask, scaling=0.25)
    got, got_w = dk.grouped_attention(mod, query, key, value, mask, scaling=0.25)
    assert got.shape == want.shape == (B, q, heads, d)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-6)


def test_grouped_attention_hands_unknown_arguments_to_the_models_eager(monkeypatch):
    mod = _attn_module(4, 2)
    seen = []

    def eager(*a, **kw):
        seen.append(kw)
        return eager_attention_forward(*a, **{k: v for k, v in kw.items() if k != "softcap"})

    monkeypatch.setattr("transformers.models.llama.modeling_llama.eager_attention_forward", eager)
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 3, 16)
    dk.grouped_attention(mod, q, k, k, None, scaling=0.25, softcap=30.0)
    assert seen and seen[0]["softcap"] == 30.0
    dk.grouped_attention(mod, q, k, k, None, scaling=0.25, position_ids=torch.zeros(1, 1))
    assert len(seen) == 1  # benign arguments stay on the grouped path


def test_twin_decodes_with_the_kernels_and_matches_eager():
    model = tiny_model()
    twin = model.twin
    assert twin.config._attn_implementation == dk.NAME
    assert model.hf_model.config._attn_implementation == "eager"  # the bridge's model is untouched
    ids = torch.tensor([[5, 9, 11, 4, 7, 3]])
    with torch.no_grad():
        got = twin(input_ids=ids).logits
        twin.config._attn_implementation = "eager"
        want = twin(input_ids=ids).logits
        twin.config._attn_implementation = dk.NAME
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _decode(net, cache, ids, steps=6):
    out = []
    with torch.no_grad():
        o = net(input_ids=ids, use_cache=True, cache=cache)
        for _ in range(steps):
            nxt = o.logits[:, -1].argmax(-1, keepdim=True)
            out.append(o.logits[:, -1])
            o = net(input_ids=nxt, use_cache=True, cache=o.cache)
    return torch.stack(out), o.cache


def test_growing_cache_is_bit_identical_to_dynamic_cache(monkeypatch):
    monkeypatch.setattr(dk, "GROW", 2)  # reallocate often
    net = tiny_model().twin
    ids = torch.tensor([[5, 9, 11, 4], [7, 3, 2, 8]])
    want, wc = _decode(net, DynamicCache(config=net.config), ids)
    cache = dk.new_cache(net)
    assert all(type(layer) is dk.growing_layer_class() for layer in cache.layers)
    got, gc = _decode(net, cache, ids)
    assert torch.equal(got, want)
    for a, b in zip(gc.layers, wc.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert a.get_seq_length() == b.get_seq_length() == 4 + 6
    # compaction and assignment go through as before
    gc.batch_select_indices(torch.tensor([1]))
    wc.batch_select_indices(torch.tensor([1]))
    more_g, _ = _decode(net, gc, torch.tensor([[6]]), steps=3)
    more_w, _ = _decode(net, wc, torch.tensor([[6]]), steps=3)
    assert torch.equal(more_g, more_w)


def test_growing_cache_keeps_room_between_reallocations():
    layer = dk.growing_layer_class()()
    k = torch.randn(2, 3, 5, 4)
    layer.update(k, k)
    buf = layer._k
    layer.update(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4))
    assert layer._k is buf  # written in place
    assert layer.keys.shape == (2, 3, 6, 4) and torch.equal(layer.keys[..., :5, :], k)
    layer.keys = layer.keys[..., 2:, :]  # trimming assigns a shorter tensor
    assert layer.get_seq_length() == 4


def test_chunked_unembedding_is_bit_identical():
    """The twin chunks its unembedding only where the probe finds it exact on this machine, and
    then it is exact on fresh inputs too; elsewhere it keeps the plain layer."""
    hf = tiny_hf_model(vocab_size=3 * dk.CHUNK * 2 + 17)  # > 4 chunks: the twin may take it
    lin = hf.get_output_embeddings()
    exact = dk.chunking_is_exact(lin)
    model = wrap_model(hf, tiny_tokenizer(), name="tiny-wide")
    got = model.twin.get_output_embeddings()
    assert isinstance(got, dk.ChunkedUnembed) == exact
    if exact:
        assert got.weight is lin.weight  # shared, not copied
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        assert torch.equal(got(x), lin(x))
    rows = make_rows([as_messages("hello there")], n=2)
    out = generate(model, rows, Sampling(max_new_tokens=5, temperature=1.0, seed=3))
    assert all(c.n_tokens >= 1 for c in out)


def test_chunking_is_decided_by_the_probe(monkeypatch):
    """A machine whose BLAS sums the pieces in another order keeps the plain layer; one where
    they agree gets the chunked one, sharing its weights."""
    lin = torch.nn.Linear(64, 5 * dk.CHUNK + 3)
    plain = dk.ChunkedUnembed.forward
    monkeypatch.setattr(dk.ChunkedUnembed, "forward", lambda self, x: plain(self, x) + 1e-6)  # one ulp-scale change
    assert dk.chunking_is_exact(lin) is False
    net = tiny_hf_model(vocab_size=5 * dk.CHUNK + 3)
    assert "chunked unembedding" not in dk.prepare_twin(net)
    assert type(net.get_output_embeddings()) is torch.nn.Linear
    monkeypatch.setattr(dk.ChunkedUnembed, "forward", plain)
    monkeypatch.setattr(dk, "chunking_is_exact", lambda linear: True)
    net = tiny_hf_model(vocab_size=5 * dk.CHUNK + 3)
    w = net.get_output_embeddings().weight
    assert "chunked unembedding" in dk.prepare_twin(net)
    assert isinstance(net.get_output_embeddings(), dk.ChunkedUnembed) and net.get_output_embeddings().weight is w
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.allclose(net.get_output_embeddings()(x), torch.nn.functional.linear(x, w, net.get_output_embeddings().bias), atol=1e-5)


def test_prepare_twin_leaves_other_attention_alone():
    hf = tiny_hf_model()
    hf.config._attn_implementation = "sdpa"
    assert dk.prepare_twin(hf) == []
    assert hf.config._attn_implementation == "sdpa"
