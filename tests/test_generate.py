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


@pytest.mark.parametrize("vocab", [7, 49152])
def test_sampler_draws_the_tokens_of_the_float64_inverse_cdf(vocab):
    """The sampler's token is where the row's uniform draw falls in the float64 running sum of
    its probabilities, computed as torch.cumsum(..., dtype=float64) would (the form the recorded
    answers were sampled with): the same tokens for rows of every shape and temperature."""
    from steerkit.generate import _sample

    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(64, vocab, generator=g) * torch.linspace(0.5, 8.0, 64)[:, None]
    temps = [0.7 if i % 2 else 1.0 for i in range(64)]
    seeds = range(1000, 1064)
    got = _sample(logits, [Sampling(temperature=t) for t in temps], [torch.Generator().manual_seed(s) for s in seeds])
    probs = torch.softmax(logits / torch.tensor(temps)[:, None], dim=-1)
    cdf = torch.cumsum(probs, -1, dtype=torch.float64)
    u = torch.cat([torch.rand(1, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds])
    want = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=vocab - 1)[:, 0]
    assert torch.equal(got, want)
    assert torch.equal(probs.double().cumsum(-1), cdf)


def _nucleus_by_full_sort(probs, top_p):
    """The definition: sort every row, keep the smallest prefix whose mass reaches top_p."""
    sp, si = probs.sort(dim=-1, descending=True)
    drop = (sp.cumsum(-1) - sp > top_p) & (top_p < 1)
    return torch.zeros_like(probs).scatter(-1, si, sp.masked_fill(drop, 0.0))


@pytest.mark.parametrize("vocab", [5, 300, 49152])
@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])  # flat rows (nucleus past the top k: sorted whole) to peaked ones
def test_nucleus_keeps_the_tokens_a_full_sort_keeps(vocab, scale):
    from steerkit.generate import _nucleus

    g = torch.Generator().manual_seed(vocab + int(scale * 10))
    probs = torch.softmax(torch.randn(8, vocab, generator=g) * scale, -1)
    top_p = torch.tensor([[0.9], [1.0], [0.5], [0.99], [0.999], [0.05], [0.95], [0.3]])
    assert torch.equal(_nucleus(probs, top_p), _nucleus_by_full_sort(probs, top_p))


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


# --- a prompt start shared by the batch is prefilled once per steering group -------------------

SYSTEM = "You are a careful assistant who answers briefly, kindly and well."


def _shared_rows(d, strengths):
    """Rows with one long system prompt and different questions, steered per strength group."""
    ivs = [Intervention(d, "add", s) for s in strengths]
    qs = ["hello world", "what now?", "tell me a story about the sea", "hi"]
    return [Row(as_messages(q, system=SYSTEM), prompt_index=i, interventions=(ivs[i % len(ivs)],)) for i, q in enumerate(qs)]


def _spy_prefix(monkeypatch):
    from steerkit.generate import DecodeEngine

    seen = []
    real = DecodeEngine._shared_prefix

    def spy(self, rows, ids, cache):
        out = real(self, rows, ids, cache)
        seen.append(out)
        return out

    monkeypatch.setattr(DecodeEngine, "_shared_prefix", spy)
    return seen


@pytest.mark.parametrize("strengths", [(0.0,), (3.0, -6.0)])
def test_shared_prompt_start_equals_the_uncached_reference(tiny, d, strengths, monkeypatch):
    seen = _spy_prefix(monkeypatch)
    rows = _shared_rows(d, strengths)
    got = generate(tiny, rows, GREEDY, batch_size=len(rows))
    P, groups, starts = seen[0]
    assert P >= 8 and len(set(groups)) == len(strengths) == len(starts)  # the prefix was shared, once per strength
    for r, c in zip(rows, got):
        assert c.token_ids == manual_greedy(tiny, r.messages, d.vector, r.interventions[0].strength, 1, GREEDY.max_new_tokens)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_shared_prompt_start_equals_per_row_prefill(tiny, d, positions, monkeypatch):
    import steerkit.generate as gen

    rows = _shared_rows(d, (4.0, -4.0, 0.0))
    s = Sampling(max_new_tokens=10, temperature=1.0, seed=5)
    shared = generate(tiny, rows, s, batch_size=4, positions=positions, logprobs=0)
    monkeypatch.setattr(gen, "MIN_SHARED_PREFIX", 10**9)
    alone = generate(tiny, rows, s, batch_size=4, positions=positions, logprobs=0)
    for a, b in zip(shared, alone):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_shared_prefix_groups_rows_by_their_steering(tiny, d):
    from steerkit.decode_kernels import new_cache
    from steerkit.generate import DecodeEngine

    a, b = Intervention(d, "add", 1.0), Intervention(d, "add", 2.0)
    rows = [Row(as_messages(q, system=SYSTEM), interventions=iv) for q, iv in [("x", (a,)), ("y", (b,)), ("z", (a,)), ("w", ())]]
    ids = [chat_tokens(tiny, r.messages) for r in rows]
    with DecodeEngine(tiny) as e:
        P, groups, starts = e._shared_prefix(rows, ids, new_cache(e.net))
    assert 0 < P < min(map(len, ids)) and all(x[:P] == ids[0][:P] for x in ids)
    assert groups == [0, 1, 0, 2] and starts == [None, None, None]
    with DecodeEngine(tiny, positions="generated") as e:  # the prompt is not steered: one group
        assert e._shared_prefix(rows, ids, new_cache(e.net))[1] == [0, 0, 0, 0]
    with DecodeEngine(tiny) as e:  # no common start worth sharing
        assert e._shared_prefix(rows[:2], [[1, 2, 3], [4, 5, 6]], new_cache(e.net))[0] == 0


def test_prefix_cache_serves_later_batches_and_single_requests(tiny, d, monkeypatch):
    """A start run once is reused by later engines sharing the cache; a single request whose
    prompt begins like an earlier one stores its start for the next; tokens match per-row prefill."""
    import steerkit.generate as gen
    from steerkit.generate import DecodeEngine, PrefixCache

    iv = Intervention(d, "add", 3.0)
    qs = ["hello world", "what now?", "tell me a story", "hi there", "one more"]
    rows = [Row(as_messages(q, system=SYSTEM), prompt_index=i, interventions=(iv,) if i % 2 else ()) for i, q in enumerate(qs)]

    def run(row_groups, cache):
        out = []
        for group in row_groups:
            with DecodeEngine(tiny, GREEDY, prefixes=cache) as e:
                live = e.add(group, logprobs=0)
                while e.rows:
                    e.step()
            out += [lv.completion for lv in live]
        return out

    cache = PrefixCache()
    got = run([rows[:2], [rows[2]], [rows[3]], [rows[4]]], cache)
    # rows 0 and 1 are steered differently: sharing inside that batch saves nothing; row 2 begins
    # like row 0 (runs its start and stores it), row 3 like row 1 (stores), row 4 finds row 2's
    assert (cache.runs, cache.hits) == (2, 1)
    cache.hits = 0
    again = run([rows[:2], [rows[2]]], cache)  # every start stored now
    assert (cache.runs, cache.hits) == (2, 3)
    assert [c.token_ids for c in again] == [c.token_ids for c in got[:3]]
    monkeypatch.setattr(gen, "MIN_SHARED_PREFIX", 10**9)
    want = run([[r] for r in rows], PrefixCache())
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_prefix_cache_keeps_steerings_apart_and_forgets_the_oldest(tiny):
    from steerkit.generate import PrefixCache

    c = PrefixCache(max_entries=2)
    c.bind(tiny.twin)
    kv = [(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))]
    c.put((), [1, 2, 3], kv, ())
    assert c.find(("other",), [1, 2, 3, 4], 10)[0] == 0  # another steering: not this start
    assert c.find((), [1, 2, 9], 10)[0] == 2 and c.find((), [1, 2, 3, 4], 2)[0] == 2  # shared part, capped
    c.put((), [5, 6, 7], kv, ())
    c.put((), [8, 9, 9], kv, ())
    assert c.find((), [1, 2, 3], 10)[0] == 0 and len(c.entries) == 2
    c.remember((), [4, 4, 4, 4])
    assert c.seen((), [4, 4, 4, 1], 10) == 3 and c.seen(("x",), [4, 4, 4, 1], 10) == 0
    c.bind(torch.nn.Linear(1, 1))  # another model: nothing carries over
    assert not c.entries and not c.recent
