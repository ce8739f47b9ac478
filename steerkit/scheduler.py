"""The server's batching worker: one thread owns the model and runs queued requests together.

Requests (:class:`Job`, ``n`` rows each) wait in a FIFO queue. Before it starts a batch of fewer
than ``max_batch`` rows, the worker waits up to ``batch_wait`` seconds (50 ms) for more (clients
that send together arrive a few ms apart), then takes everything queued, up to ``max_batch`` rows (always at least one job), and makes one
:func:`steerkit.generate.generate` call for all of them: rows with different steering and
different sampling settings share each forward pass (each row carries its own interventions
and its own :class:`~steerkit.generate.Sampling`). Batching is static: a job that arrives
while a batch runs waits for the next one, and a batch returns when its last row ends.

Events go back to the caller through ``Job.emit`` (called on the worker thread; the server
bridges them to its event loop): ``("delta", k, text)`` for streamed text of choice ``k``,
``("done", [ChoiceResult, ...])`` or ``("error", exception)``. A job whose ``cancelled`` flag is
set (its client went away) leaves the batch at its next token.

Stop strings are handled here rather than in ``generate`` (each request has its own): text that
could be the start of a stop string is held back from the stream until it is decided.

What it leaves out: continuous batching (joining a running batch) and priorities.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from steerkit.generate import Completion, Row, generate
from steerkit.interventions import Positions

Event = tuple[Any, ...]


@dataclass
class _RowState:
    shown: str = ""  # text already streamed
    final: str | None = None  # text cut at a stop string, once one appeared


@dataclass(frozen=True)
class ChoiceResult:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    prompt_tokens: int
    seed: int


@dataclass(eq=False)
class Job:
    """One request: its rows (``tag`` is set to ``(job, k)``), stop strings and logprobs wish."""

    rows: list[Row]
    emit: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's and the top k
    stream: bool = False
    cancelled: bool = False
    states: list[_RowState] = field(default_factory=list)
    results: dict[int, ChoiceResult] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rows = [Row(r.messages, r.prompt_index, r.sample_index, r.interventions, (self, k), r.sampling) for k, r in enumerate(self.rows)]
        self.states = [_RowState() for _ in self.rows]

    def cancel(self) -> None:
        self.cancelled = True


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` might begin a stop string (or half a character)."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, 1)
    return hold


class Scheduler:
    """The worker thread and its queue. ``submit`` from any thread; ``stop`` joins the worker."""

    def __init__(self, model: Any, *, max_batch: int = 16, max_queue: int = 256, positions: Positions = "all", batch_wait: float = 0.05) -> None:
        self.model = model
        self.max_batch = max_batch
        self.batch_wait = batch_wait  # seconds an idle worker waits for more requests before it starts a batch
        self.max_queue = max_queue
        self.positions = positions
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "rows_cancelled": 0, "largest_batch": 0, "running_rows": 0, "errors": 0}

    # --- control -------------------------------------------------------------------------------

    def start(self) -> None:
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="steerkit-worker", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            for job in self._queue:
                job.cancel()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def queued_rows(self) -> int:
        with self._cv:
            return sum(len(j.rows) for j in self._queue if not j.cancelled)

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full (the caller answers 429)."""
        self.start()
        with self._cv:
            if sum(len(j.rows) for j in self._queue) + len(job.rows) > self.max_queue:
                return False
            self._queue.append(job)
            self.stats["requests"] += 1
            self._cv.notify()
        return True

    # --- the worker ----------------------------------------------------------------------------

    def _take(self) -> list[Job]:
        with self._cv:
            while not self._stopping and not any(not j.cancelled for j in self._queue):
                self._queue.clear()
                self._cv.wait()
            end = time.monotonic() + self.batch_wait
            while not self._stopping and sum(len(j.rows) for j in self._queue if not j.cancelled) < self.max_batch:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            jobs: list[Job] = []
            rows = 0
            while self._queue:
                j = self._queue[0]
                if j.cancelled:
                    self._queue.popleft()
                    continue
                if jobs and rows + len(j.rows) > self.max_batch:
                    break
                jobs.append(self._queue.popleft())
                rows += len(j.rows)
            return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if self._stopping:
                for j in jobs:
                    _safe_emit(j, ("error", RuntimeError("the server is shutting down")))
                return
            self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        rows = [r for j in jobs for r in j.rows]
        wants = [j.logprobs for j in jobs if j.logprobs is not None]
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        self.stats["running_rows"] = len(rows)
        try:
            generate(
                self.model,
                rows,
                batch_size=self.max_batch,
                positions=self.positions,
                logprobs=max(wants) if wants else None,
                on_token=self._on_token,
                on_complete=self._on_complete,
            )
        except Exception as e:  # a request that slipped past validation must not kill the worker
            self.stats["errors"] += 1
            for j in jobs:
                if len(j.results) < len(j.rows):
                    _safe_emit(j, ("error", e))
        finally:
            self.stats["running_rows"] = 0

    def _on_token(self, row: Row, token: int, ids: list[int]) -> bool | None:
        job, k = row.tag
        if job.cancelled:
            return False
        st = job.states[k]
        if not job.stream and not job.stop:
            return None
        text = self.model.tokenizer.decode(ids, skip_special_tokens=True)
        if job.stop:
            cuts = [text.find(s) for s in job.stop if s in text]
            if cuts:
                st.final = text[: min(cuts)]
                self._flush(job, k, st.final)
                return False  # the row ends here; reported as finish_reason "stop"
        if job.stream:
            self._flush(job, k, text[: len(text) - _held_back(text, job.stop)])
        return None

    def _flush(self, job: Job, k: int, text: str) -> None:
        st = job.states[k]
        if job.stream and len(text) > len(st.shown):
            _safe_emit(job, ("delta", k, text[len(st.shown) :]))
            st.shown = text

    def _on_complete(self, c: Completion) -> None:
        job, k = c.row.tag
        st = job.states[k]
        if job.cancelled:
            if c.finish_reason == "cancelled":  # it left the batch early
                self.stats["rows_cancelled"] += 1
            job.results[k] = None  # type: ignore[assignment]
        else:
            text = c.text if st.final is None else st.final
            self._flush(job, k, text)
            n = len(c.token_ids)
            job.results[k] = ChoiceResult(
                index=k,
                text=text,
                token_ids=c.token_ids,
                finish_reason="stop" if st.final is not None else c.finish_reason,
                logprobs=c.logprobs[:n] if c.logprobs is not None and job.logprobs is not None else None,
                top_logprobs=[t[: job.logprobs] for t in c.top_logprobs[:n]] if c.top_logprobs is not None and job.logprobs else None,
                prompt_tokens=c.prompt_tokens,
                seed=c.seed,
            )
        if len(job.results) == len(job.rows) and not job.cancelled:
            _safe_emit(job, ("done", [job.results[i] for i in range(len(job.rows))]))


def _safe_emit(job: Job, event: Event) -> None:
    try:
        job.emit(event)
    except Exception:  # the caller's event loop is gone (client or server shut down)
        job.cancel()

