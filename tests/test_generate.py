"""Steered generation on a tiny random model: every decode step is steered, strength 0 is a
no-op, hooks never outlive a call, rows with different strengths share a batch correctly."""

import pytest
import torch

from steerkit.directions import Direction
from steerkit.errors import SteerkitError
from steerkit.generate import Row, Sampling, as_messages, chat_tokens, generate, make_rows
from steerkit.interventions import Intervention, SteeringPlan, active_hook_count, steering

GREEDY = Sampling(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def d(tiny):
    g = torch.Generator().manual_seed(1)
    return Direction(name="t", vector=torch.randn(tiny.d_model, generator=g), model=tiny.name, layer=1,
                     hook_name="blocks.1.hook_out", kind="vector", median_norm=1.0)


def manual_greedy(model, messages, u, coeff, layer, n):
    """Reference: no KV cache, the whole sequence re-run every step with a plain torch hook
    on the HF decoder layer adding coeff*u at every position but the first."""
    ids = torch.tensor([chat_tokens(model, messages)])
    layer_mod = model.hf_model.model.layers[layer]

    def hook(mod, inp, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, 1:] += coeff * u
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    out = []
    with torch.no_grad():
        for _ in range(n):
            handle = layer_mod.register_forward_hook(hook)
            try:
                logits = model.hf_model(ids, use_cache=False).logits
            finally:
                handle.remove()
            t = int(logits[0, -1].argmax())
            if t in model.eos_token_ids():
                break
            out.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return out


def test_steering_applied_on_every_cached_step(tiny, d):
    msgs = as_messages("hello world")
    for coeff in (0.0, 3.0, -6.0):
        rows = [Row(msgs, interventions=(Intervention(d, "add", coeff),))]
        got = generate(tiny, rows, GREEDY)[0].token_ids
        assert got == manual_greedy(tiny, msgs, d.vector, coeff, 1, GREEDY.max_new_tokens)


def test_steering_changes_output(tiny, d):
    msgs = as_messages("hello world")
    plain = generate(tiny, [Row(msgs)], GREEDY)[0].token_ids
    steered = generate(tiny, [Row(msgs, interventions=(Intervention(d, "add", 8.0),))], GREEDY)[0].token_ids
    assert plain != steered


def test_strength_zero_is_exact_noop_on_logits(tiny, d):
    ids = torch.tensor([chat_tokens(tiny, as_messages("I feel bored"))])
    with torch.no_grad():
        ref = tiny.hf_model(ids).logits
        with steering(tiny, SteeringPlan.uniform([Intervention(d, "add", 0.0)])):
            got = tiny.hf_model(ids).logits
    assert torch.equal(ref, got)


def test_strength_zero_same_tokens_sampled(tiny, d):
    s = Sampling(max_new_tokens=10, temperature=1.0, seed=3)
    rows0 = make_rows([as_messages("hello")], n=2)
    rows1 = make_rows([as_messages("hello")], n=2, interventions=[Intervention(d, "add", 0.0)])
    assert [c.token_ids for c in generate(tiny, rows0, s)] == [c.token_ids for c in generate(tiny, rows1, s)]


def test_hooks_removed_after_exception(tiny, d):
    assert active_hook_count(tiny) == 0

    def boom(row, t, ids):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(tiny, [Row(as_messages("hi"), interventions=(Intervention(d, "add", 1.0),))], GREEDY, on_token=boom)
    assert active_hook_count(tiny) == 0
    with pytest.raises(RuntimeError):
        with steering(tiny, SteeringPlan.uniform([Intervention(d, "add", 1.0)])):
            assert active_hook_count(tiny) == 1
            raise RuntimeError("x")
    assert active_hook_count(tiny) == 0


def test_user_hooks_survive(tiny, d):
    hp = tiny.bridge.hook_dict["blocks.1.hook_out"]
    mine = hp.add_hook(lambda x, hook=None: x)
    try:
        with steering(tiny, SteeringPlan.uniform([Intervention(d, "add", 1.0)])):
            pass
        assert active_hook_count(tiny) == 1
    finally:
        mine.hook.remove()
        hp.fwd_hooks.remove(mine)


def test_mixed_strength_batch_equals_separate_runs(tiny, d):
    msgs = [as_messages("hello world"), as_messages("If you were ruler of the world, what would you do?")]
    strengths = [0.0, 4.0, -4.0]
    rows = [Row(m, prompt_index=i, sample_index=k, interventions=(Intervention(d, "add", s),))
            for i, m in enumerate(msgs) for k, s in enumerate(strengths)]
    batched = generate(tiny, rows, GREEDY, batch_size=len(rows))
    single = [generate(tiny, [r], GREEDY, batch_size=1)[0] for r in rows]
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]


def test_seed_determinism_and_independence_from_batch(tiny):
    s = Sampling(max_new_tokens=10, temperature=1.0, seed=7)
    rows = make_rows([as_messages("hello"), as_messages("money advice")], n=3)
    a = [c.token_ids for c in generate(tiny, rows, s, batch_size=6)]
    b = [c.token_ids for c in generate(tiny, rows, s, batch_size=6)]
    c = [c.token_ids for c in generate(tiny, rows, s, batch_size=1)]
    assert a == b == c
    other = [c.token_ids for c in generate(tiny, rows, Sampling(max_new_tokens=10, temperature=1.0, seed=8), batch_size=6)]
    assert other != a


def steered_positions(model, d, positions, prompts):
    """Run generation and record, per forward call, which positions the steering changed:
    block 1's output before our hook (a prepended spy) vs block 2's input (after it)."""
    before, after = [], []
    pre = model.bridge.hook_dict["blocks.1.hook_out"].add_hook(lambda x, hook=None: before.append(x.clone()), prepend=True)
    post = model.bridge.hook_dict["blocks.2.hook_in"].add_hook(lambda x, hook=None: after.append(x.clone()))
    try:
        rows = [Row(as_messages(p), prompt_index=i, interventions=(Intervention(d, "add", 1.0),)) for i, p in enumerate(prompts)]
        generate(model, rows, Sampling(max_new_tokens=3, temperature=0.0), positions=positions, batch_size=len(rows))
    finally:
        for hp, h in ((model.bridge.hook_dict["blocks.1.hook_out"], pre), (model.bridge.hook_dict["blocks.2.hook_in"], post)):
            h.hook.remove()
            hp.fwd_hooks.remove(h)
    return [(a - b).abs().sum(-1) > 0 for b, a in zip(before, after)]


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_positions_masks_under_left_padding(tiny, d, positions):
    prompts = ["hello world, how are you doing today my friend", "hi"]
    lens = [len(chat_tokens(tiny, as_messages(p))) for p in prompts]
    changed = steered_positions(tiny, d, positions, prompts)
    prefill, steps = changed[0], changed[1:]
    T = max(lens)
    for b, L in enumerate(lens):
        pad = T - L
        row = prefill[b]
        assert not row[: pad + 1].any()  # padding and each row's first token never steered
        if positions == "generated":
            assert row.tolist() == [False] * (T - 1) + [True]
        else:
            assert row[pad + 1 :].all()
    for st in steps:
        assert st.all() if positions != "prompt" else not st.any()


def test_ablate_and_clamp_run(tiny, d):
    msgs = as_messages("hello world")
    for iv in (Intervention(d, "ablate"), Intervention(d, "clamp", 2.0)):
        c = generate(tiny, [Row(msgs, interventions=(iv,))], GREEDY)[0]
        assert c.n_tokens > 0


def test_context_length_refused(tiny):
    with pytest.raises(SteerkitError, match="context length"):
        generate(tiny, [Row(as_messages("hello " * 400))], Sampling(max_new_tokens=200))


def test_bad_sampling_refused():
    with pytest.raises(SteerkitError, match="temperature"):
        Sampling(temperature=float("nan"))
    with pytest.raises(SteerkitError, match="top-p"):
        Sampling(top_p=0)


def test_sampler_matches_distribution_and_top_p():
    from steerkit.generate import _sample

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    logits = probs.log().expand(n, 4)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    got = _sample(logits, Sampling(temperature=1.0), gens)
    freq = torch.bincount(got, minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.03), freq
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    got = _sample(logits, Sampling(temperature=1.0, top_p=0.7), gens)
    assert set(got.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is cut
    freq = torch.bincount(got, minlength=4).float() / n
    assert abs(float(freq[0]) - 0.5 / 0.8) < 0.03


def test_generation_runs_on_the_unwrapped_twin_and_matches_the_bridge_path(tiny, d):
    """Generation runs on the twin (same weights, no bridge wrappers); a user's own bridge hook
    sends it through the bridge instead, and both paths give the same tokens."""
    assert tiny.twin is not None and tiny.twin_layers is not None
    assert tiny.twin.get_input_embeddings().weight.data_ptr() == tiny.hf_model.get_input_embeddings().weight.data_ptr()
    msgs = [as_messages("hello world"), as_messages("If you were ruler of the world, what would you do?")]
    rows = [Row(m, prompt_index=i, sample_index=k, interventions=ivs) for i, m in enumerate(msgs)
            for k, ivs in enumerate([(), (Intervention(d, "add", 4.0),), (Intervention(d, "clamp", -2.0),), (Intervention(d, "ablate", 0.0),)])]
    sampling = Sampling(max_new_tokens=12, temperature=1.0, seed=3)
    calls = []
    counter = tiny.twin_layers[0].register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        on_twin = generate(tiny, rows, sampling, batch_size=4)
        assert calls, "generation did not run on the twin"
        calls.clear()
        hp = tiny.bridge.hook_dict["blocks.0.hook_out"]
        mine = hp.add_hook(lambda x, hook=None: x)
        try:
            on_bridge = generate(tiny, rows, sampling, batch_size=4)
        finally:
            mine.hook.remove()
            hp.fwd_hooks.remove(mine)
        assert not calls, "a user's bridge hook must send generation through the bridge"
    finally:
        counter.remove()
    assert [c.token_ids for c in on_twin] == [c.token_ids for c in on_bridge]
    assert len({tuple(c.token_ids) for c in on_twin}) > 1
    assert active_hook_count(tiny) == 0


def test_bridge_kv_cache_matches_an_unwrapped_reference(tiny):
    """Cached decode through the bridge-wrapped model equals a never-wrapped copy of the same
    weights, under left padding. transformers 5.24 renamed the attention layers' cache argument
    (``past_key_values`` -> ``cache``) and transformer-lens 4.3's bridge then left the cache
    empty, so every decode step ignored the prompt (issue 19); this names that failure."""
    from steerkit.testing import tiny_hf_model

    ref = tiny_hf_model()  # same seed, same weights, never wrapped by a bridge
    ids = [chat_tokens(tiny, as_messages(p)) for p in ("hello world", "If you were ruler of the world, what would you do?")]
    T = max(map(len, ids))
    inp = torch.full((2, T), tiny.pad_token_id())
    attn = torch.zeros((2, T), dtype=torch.long)
    for b, x in enumerate(ids):
        inp[b, T - len(x):], attn[b, T - len(x):] = torch.tensor(x), 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    got = {}
    with torch.inference_mode():
        for name, net in (("ref", ref), ("bridge", tiny.hf_model), ("twin", tiny.twin)):
            o = net(input_ids=inp, attention_mask=attn, position_ids=pos, use_cache=True)
            assert o.past_key_values.get_seq_length() == T, f"{name}: prefill left the KV cache empty"
            a2 = torch.cat([attn, torch.ones((2, 1), dtype=torch.long)], 1)
            nxt = o.logits[:, -1].argmax(-1)[:, None]
            o2 = net(input_ids=nxt, attention_mask=a2, position_ids=a2.sum(-1, keepdim=True) - 1,
                     past_key_values=o.past_key_values, use_cache=True)
            got[name] = o2.logits[:, -1]
    torch.testing.assert_close(got["bridge"], got["ref"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["twin"], got["ref"], atol=1e-5, rtol=1e-5)
