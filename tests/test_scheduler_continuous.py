"""Continuous batching (tiny random model): rows join a running batch between decode steps and
leave when done, each with its own steering and sampling, and get the tokens they get alone.

Steps are counted, not seconds: ``DecodeEngine.steps`` and ``Scheduler.stats["steps"]`` count
decode forward passes."""

from __future__ import annotations

import threading

import pytest
import torch

from steerkit.directions import from_vector
from steerkit.generate import DecodeEngine, Row, Sampling, as_messages, generate
from steerkit.interventions import Intervention, active_hook_count
from steerkit.scheduler import Job, Scheduler

PROMPTS = ["hello", "If you were ruler of the world, what would you do?", "money advice", "hi", "the quick brown fox jumps"]


@pytest.fixture(scope="module")
def tilt(tiny):
    """The embedding of token 'a' at the last layer: strongly added, the model says 'aaaa...'."""
    a = tiny.tokenizer.convert_tokens_to_ids("a")
    return from_vector(tiny.hf_model.model.embed_tokens.weight[a].detach().clone(), name="tilt", model=tiny, layer=3, kind="vector", median_norm=0.7)


@pytest.fixture(scope="module")
def d(tiny):
    g = torch.Generator().manual_seed(1)
    return from_vector(torch.randn(tiny.d_model, generator=g), name="t", model=tiny, layer=1, kind="vector", median_norm=1.0)


def alone(model, row, **kw):
    return generate(model, [row], **kw)[0]


def run_staggered(model, schedule, **kw):
    """``schedule``: (step, row) pairs; each row is added once the engine has run ``step`` decode
    steps. Returns the LiveRows in schedule order, and the engine's batch size at each step."""
    sizes = []
    hooks = active_hook_count(model)  # other tests' hooks may be on the shared model
    with DecodeEngine(model, **kw) as engine:
        pending = list(enumerate(schedule))
        live = [None] * len(schedule)
        while pending or engine.rows:
            due = [(i, r) for i, (s, r) in pending if s <= engine.steps]
            assert due or engine.rows, "the schedule leaves the engine empty"
            if due:
                pending = [(i, (s, r)) for i, (s, r) in pending if s > engine.steps]
                for (i, _), lv in zip(due, engine.add([r for _, r in due])):
                    live[i] = lv
            sizes.append(len(engine.rows))
            engine.step()
    assert active_hook_count(model) == hooks  # the engine's hooks went with it
    return live, sizes


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_joined_rows_get_the_tokens_they_get_alone(tiny, d, tilt, temperature):
    # steering on layer 1, then a row steered on layer 3 too: hooks are added while rows run
    ivs = [(), (Intervention(d, "add", 4.0),), (Intervention(d, "clamp", -2.0),), (), (Intervention(d, "add", -3.0), Intervention(tilt, "add", 1.5))]
    lens = [30, 12, 20, 6, 16]
    rows = [Row(as_messages(p), i, 0, iv, sampling=Sampling(n, temperature, 0.9 if i % 2 else 1.0, seed=10 + i))
            for i, (p, iv, n) in enumerate(zip(PROMPTS, ivs, lens))]
    # rows 0-1 start; 2 joins at step 3, 3 and 4 at step 5 (one prefill for both)
    live, sizes = run_staggered(tiny, [(0, rows[0]), (0, rows[1]), (3, rows[2]), (5, rows[3]), (5, rows[4])], ignore_eos=True)
    ref = [alone(tiny, r, ignore_eos=True) for r in rows]
    static = generate(tiny, rows, batch_size=len(rows), ignore_eos=True)
    got = [lv.completion for lv in live]
    assert [c.token_ids for c in got] == [c.token_ids for c in ref] == [c.token_ids for c in static]
    assert [c.seed for c in got] == [c.seed for c in ref]
    assert [len(c.token_ids) for c in got] == lens
    # each joined row's first token came in the first step after its prefill: no decode pass between
    assert [lv.first_token_step - lv.joined_step for lv in live] == [0] * 5
    assert [lv.joined_step for lv in live] == [0, 0, 3, 5, 5]
    assert max(sizes) == 5 and sizes[:3] == [2, 2, 2] and sizes[3] == 3


def test_a_longer_prompt_joining_pads_the_running_cache(tiny):
    """A prompt longer than the running batch's cache: the running rows are left-padded to it."""
    p = ["hi", "If you were ruler of the world, what would you do? Tell me everything.", "money", "hello world how are you doing"]
    rows = [Row(as_messages(x), i, sampling=Sampling(12, 0.0 if i % 2 else 1.0, 1.0, seed=i)) for i, x in enumerate(p)]
    with DecodeEngine(tiny, ignore_eos=True, trim=True) as engine:
        live = engine.add(rows[:1])
        engine.step()
        width = engine._attn.shape[1]
        live += engine.add(rows[1:2])
        assert engine._attn.shape[1] == len(live[1].ids) > width
        engine.step()
        engine.step()
        live += engine.add(rows[2:])
        while engine.rows:
            engine.step()
    assert [lv.completion.token_ids for lv in live] == [alone(tiny, r, ignore_eos=True).token_ids for r in rows]


def test_rows_leave_and_the_others_continue_unchanged(tiny):
    s = [Sampling(n, 1.0, 1.0, seed=n) for n in (3, 25, 7)]
    rows = [Row(as_messages(p), i, sampling=x) for i, (p, x) in enumerate(zip([PROMPTS[1], PROMPTS[0], PROMPTS[2]], s))]
    sizes, widths = [], []
    with DecodeEngine(tiny, ignore_eos=True, trim=True) as engine:
        live = engine.add(rows)
        while engine.rows:
            sizes.append(len(engine.rows))
            engine.step()
            widths.append(engine._attn.shape[1] if engine.rows else 0)
    assert sizes == [3] * 3 + [2] * 4 + [1] * 18  # rows leave the batch as they end
    assert [lv.completion.token_ids for lv in live] == [alone(tiny, r, ignore_eos=True).token_ids for r in rows]
    # the long prompt's row left after 3 tokens: the padding it caused is trimmed from the cache
    long_len, rest = len(live[0].ids), max(len(lv.ids) for lv in live[1:])
    assert widths[1] == long_len + 2 and widths[2] == rest + 3


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_steering_of_a_joined_row_applies_only_to_it(tiny, tilt, positions):
    g = Sampling(14, 0.0)
    plain = [Row(as_messages(p), i, sampling=g) for i, p in enumerate(PROMPTS[:3])]
    steered = Row(as_messages("hello world"), 9, interventions=(Intervention(tilt, "add", 40.0),), sampling=g)
    live, _ = run_staggered(tiny, [(0, plain[0]), (0, plain[1]), (4, steered), (6, plain[2])], positions=positions, ignore_eos=True)
    got = [lv.completion.token_ids for lv in live]
    assert got[:2] + got[3:] == [alone(tiny, r, positions=positions, ignore_eos=True).token_ids for r in plain]
    want = alone(tiny, steered, positions=positions, ignore_eos=True).token_ids
    assert got[2] == want
    if positions != "prompt":
        assert want != alone(tiny, Row(steered.messages, 9, sampling=g), ignore_eos=True).token_ids


def test_engine_logprobs_per_row_and_eos(tiny):
    rows = [Row(as_messages(p), i, sampling=Sampling(20, 0.7, 1.0, seed=i)) for i, p in enumerate(PROMPTS[:3])]
    with DecodeEngine(tiny) as engine:
        a = engine.add(rows[:1], logprobs=[None])
        engine.step()
        b = engine.add(rows[1:], logprobs=[2, 0])
        while engine.rows:
            engine.step()
    assert a[0].completion.logprobs is None and a[0].completion.top_logprobs is None
    for lv, k in zip(b, (2, 0)):
        ref = alone(tiny, lv.row, logprobs=k)
        assert lv.completion.token_ids == ref.token_ids and lv.completion.finish_reason == ref.finish_reason
        assert lv.completion.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
        assert (lv.completion.top_logprobs is None) == (k == 0)


class Recorder:
    """A job's emit: events in order, a callback on each delta, and the order jobs finished in."""

    def __init__(self, name: str = "", finished: list | None = None, on_delta=None) -> None:
        self.name, self.finished, self.on_delta = name, finished, on_delta
        self.events: list = []
        self.done = threading.Event()

    def __call__(self, ev) -> None:
        self.events.append(ev)
        if ev[0] == "delta" and self.on_delta is not None:
            self.on_delta(ev)
        if ev[0] in ("done", "error"):
            if self.finished is not None:
                self.finished.append(self.name)
            self.done.set()


def test_scheduler_late_job_joins_within_one_step(tiny, tilt):
    """A long batch runs (tilt makes 'aaaa...' with no end); a job submitted while its rows make
    their 6th token gets its first token at the next step, the tokens it gets alone, and is done
    long before the batch."""
    sched = Scheduler(tiny, max_batch=8, continuous=True)
    finished: list[str] = []
    long_rows = [Row(as_messages(p), 0, k, (Intervention(tilt, "add", 80.0),), sampling=Sampling(40, 0.0)) for k, p in enumerate(PROMPTS[:4])]
    late_row = Row(as_messages("hello world"), 0, 0, sampling=Sampling(10, 1.0, 0.9, seed=5))
    late = Job([late_row], Recorder("late", finished), stream=True)
    seen = [0]

    def submit_late(ev):  # on the worker thread, in the middle of a decode step
        if ev[1] == 0:
            seen[0] += 1
            if seen[0] == 6:
                assert sched.submit(late)

    long_job = Job(long_rows, Recorder("long", finished, submit_late), stream=True)
    assert sched.submit(long_job)
    assert late.emit.done.wait(60) and long_job.emit.done.wait(60)
    sched.stop()
    assert late.emit.events[-1][0] == "done" and long_job.emit.events[-1][0] == "done"
    assert late.submitted_step == 5 and late.first_token_step - late.submitted_step <= 1
    assert sched.stats["batches"] == 1 and sched.stats["joined"] == 1 and sched.stats["largest_batch"] == 5
    got = late.emit.events[-1][1][0]
    ref = alone(tiny, late_row)
    assert got.token_ids == ref.token_ids and got.text == ref.text
    assert "".join(e[2] for e in late.emit.events if e[0] == "delta") == got.text  # streamed in order
    # the long rows ran on unchanged, and the late job finished while they were running
    results = long_job.emit.events[-1][1]
    assert [r.token_ids for r in results] == [c.token_ids for c in generate(tiny, long_rows, batch_size=4)]
    assert all(len(r.token_ids) == 40 for r in results) and finished == ["late", "long"]


def test_scheduler_cancel_stop_and_split_jobs(tiny, tilt):
    """A cancelled job leaves at its next token; a stop string ends its row; a job bigger than
    the free rows joins part by part; the rows that stay are unchanged."""
    sched = Scheduler(tiny, max_batch=4, continuous=True)
    s = Sampling(40, 0.0)
    smp = Sampling(12, 1.0, 1.0, seed=3)
    ref_text = alone(tiny, Row(as_messages("money advice"), sampling=smp)).text
    stop = ref_text[len(ref_text) // 2 : len(ref_text) // 2 + 2]
    assert stop
    count = [0]

    def on_delta(ev):  # the stopper's first streamed text: cancel the victim, send the big job
        count[0] += 1
        if count[0] == 1:
            victim.cancel()
            assert sched.submit(big)

    runner = Job([Row(as_messages("hello"), 0, 0, (Intervention(tilt, "add", 80.0),), sampling=s)], Recorder())
    victim = Job([Row(as_messages("hi"), 0, 0, (Intervention(tilt, "add", 80.0),), sampling=s)], Recorder())
    stopper = Job([Row(as_messages("money advice"), sampling=smp)], Recorder(on_delta=on_delta), stop=(stop,), stream=True)
    big = Job([Row(as_messages("hi"), 0, k, sampling=Sampling(6, 1.0, 1.0, seed=k)) for k in range(5)], Recorder())
    with sched._cv:  # all three in the first batch
        sched.start()
        assert sched.submit(runner) and sched.submit(victim) and sched.submit(stopper)
    for j in (runner, stopper, big):
        assert j.emit.done.wait(60)
    sched.stop()
    assert victim.emit.events == [] and sched.stats["rows_cancelled"] == 1
    res = stopper.emit.events[-1][1][0]
    assert res.finish_reason == "stop" and res.text == ref_text[: ref_text.find(stop)]
    assert "".join(e[2] for e in stopper.emit.events if e[0] == "delta") == res.text
    assert [r.token_ids for r in big.emit.events[-1][1]] == [c.token_ids for c in generate(tiny, big.rows)]
    assert runner.emit.events[-1][1][0].token_ids == alone(tiny, runner.rows[0]).token_ids
    assert sched.stats["largest_batch"] == 4 and sched.stats["joined"] == 5 and sched.stats["batches"] == 1


def test_scheduler_reuses_a_prompt_start_across_requests(tiny):
    """Requests one after another with the same system prompt: from the third on, the server
    prefills only what follows the stored start, with the tokens each request gets alone."""
    system = "You are a careful assistant who answers briefly, kindly and well."
    sched = Scheduler(tiny, max_batch=4, continuous=True)
    rows = [Row(as_messages(q, system=system), sampling=Sampling(8, 0.0)) for q in ["hello", "what now?", "tell me more", "bye"]]
    got = []
    for r in rows:
        job = Job([r], Recorder())
        assert sched.submit(job) and job.emit.done.wait(60)
        got.append(job.emit.events[-1][1][0])
    sched.stop()
    # the 2nd request begins like the 1st: its start is run and stored; the 3rd and 4th find it
    assert sched.prefixes.runs == 1 and sched.stats["prefix_hits"] == 2
    assert [c.token_ids for c in got] == [alone(tiny, r).token_ids for r in rows]
