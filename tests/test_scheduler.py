"""The serving pieces below HTTP: per-row sampling and cancellation in `generate`, and the
batching scheduler (tiny random model)."""

from __future__ import annotations

import threading

from steerkit.generate import Row, Sampling, as_messages, generate
from steerkit.scheduler import Job, Scheduler, _held_back


def test_per_row_sampling_equals_separate_calls(tiny):
    specs = [Sampling(10, 0.8, 1.0, 1), Sampling(6, 0.0, 1.0, 2), Sampling(12, 1.0, 0.9, 3), Sampling(8, 1.3, 0.5, 4)]
    rows = [Row(as_messages(p), 0, 0, sampling=s) for p, s in zip(["hello", "money advice", "hi", "hello world"], specs)]
    together = generate(tiny, rows, batch_size=len(rows))
    alone = [generate(tiny, [Row(r.messages)], s)[0] for r, s in zip(rows, specs)]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.seed for c in together] == [c.seed for c in alone]
    assert all(c.n_tokens <= s.max_new_tokens for c, s in zip(together, specs))


def test_on_token_false_cancels_only_that_row(tiny):
    s = Sampling(8, 1.0, 1.0, 0)
    rows = [Row(as_messages("hello"), 0, k, tag=k) for k in range(3)]
    full = generate(tiny, rows, s, batch_size=3)
    out = generate(tiny, rows, s, batch_size=3, on_token=lambda r, t, ids: False if r.tag == 1 and len(ids) == 2 else None)
    assert out[1].finish_reason == "cancelled" and out[1].token_ids == full[1].token_ids[:2]
    assert [out[0].token_ids, out[2].token_ids] == [full[0].token_ids, full[2].token_ids]


def test_held_back_text():
    assert _held_back("abc", ["cd"]) == 1
    assert _held_back("abc", ["xyz"]) == 0
    assert _held_back("ab\ufffd", []) == 1
    assert _held_back("hello wor", ["world", "or"]) == 3


def test_scheduler_batches_queued_jobs_and_skips_cancelled(tiny):
    sched = Scheduler(tiny, max_batch=4)
    done: dict[int, list] = {}
    ev = threading.Event()

    def emitter(i):
        def emit(e):
            done[i] = e
            if len(done) == 3:
                ev.set()
        return emit

    jobs = [Job([Row(as_messages("hello"), 0, k, sampling=Sampling(5, 1.0, 1.0, i)) for k in range(n)], emitter(i)) for i, n in enumerate([2, 1, 1, 3])]
    # queue all four before the worker runs: hold the worker on the condition's lock
    with sched._cv:
        sched.start()
        for j in jobs:
            assert sched.submit(j)
        jobs[2].cancel()
    assert ev.wait(60)
    sched.stop()
    assert set(done) == {0, 1, 3} and all(done[i][0] == "done" for i in done)
    assert [len(done[i][1]) for i in (0, 1, 3)] == [2, 1, 3]
    # 2 + 1 rows in the first batch (the cancelled job skipped; 3 more would pass max_batch 4)
    assert sched.stats["batches"] == 2 and sched.stats["largest_batch"] == 3
