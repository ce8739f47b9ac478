"""The server's batching worker: one thread owns the model and runs queued requests together.

Requests (:class:`Job`, ``n`` rows each) wait in a FIFO queue. An idle worker, before it starts
a batch of fewer than ``max_batch`` rows, waits up to ``batch_wait`` seconds (50 ms) for more
(clients that send together arrive a few ms apart), then takes everything queued, up to
``max_batch`` rows (static batching: whole jobs, always at least one). Rows with different steering and different
sampling settings share each forward pass (each row carries its own interventions and its own
:class:`~steerkit.generate.Sampling`).

With ``continuous=True`` (the server's default, ``ServeConfig.continuous``) batching is
continuous: the batch is a :class:`~steerkit.generate.DecodeEngine`, and between any two decode
steps the worker takes queued rows, FIFO, into the free places (up to ``max_batch`` rows
running; a job with more rows than there is room for joins part by part), prefills their
prompts together and merges their KV cache into the running one. Each row leaves as soon as it
ends, and a job's ``done`` comes when its own rows end, not the batch's. A job that arrives
while a batch runs thus gets its first token after the decode step in flight and its own
prefill. A row's tokens are the same whether it ran alone, in a static batch or joined one
mid-way (its own random generator, per-row steering masks; up to float rounding between batch
shapes). With ``continuous=False`` (this class's default; ``ServeConfig(continuous=False)``)
batching is static: a job that arrives while a batch runs waits for the next one, and a batch
returns when its last row ends. A model whose KV cache cannot be merged (sliding-window or
static caches) gets a new batch only when the running one is empty.

Events go back to the caller through ``Job.emit`` (called on the worker thread; the server
bridges them to its event loop): ``("delta", k, text)`` for streamed text of choice ``k``,
``("done", [ChoiceResult, ...])`` or ``("error", exception)``, in that order per job. A job
whose ``cancelled`` flag is set (its client went away) leaves the batch at its next token.

Stop strings are handled here rather than in ``generate`` (each request has its own): text that
could be the start of a stop string is held back from the stream until it is decided.

What it leaves out: priorities and preemption (a long request keeps its row until it ends), a
token budget per step (a joining job's prefill runs as one forward pass, between two decode
steps: long prompts joining a batch delay its next token by their prefill), and chunked
prefill.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from steerkit.decode_kernels import PrefixCache
from steerkit.generate import Completion, DecodeEngine, Row, generate
from steerkit.interventions import Positions
from steerkit.models import LoadedModel

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
    # when it was queued and when its first token came: time.monotonic() and the worker's
    # decode-step count (``Scheduler.stats["steps"]``), for time to first token
    submitted_at: float | None = None
    submitted_step: int | None = None
    first_token_at: float | None = None
    first_token_step: int | None = None
    admitted: int = 0  # rows handed to a running batch so far (continuous batching may split a job)

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

    def __init__(self, model: LoadedModel, *, max_batch: int = 16, max_queue: int = 256, positions: Positions = "all", batch_wait: float = 0.05,
                 continuous: bool = False) -> None:
        self.model = model
        self.max_batch = max_batch
        self.continuous = continuous  # rows join the running batch between decode steps
        self.batch_wait = batch_wait  # seconds an idle worker waits for more requests before it starts a batch
        self.max_queue = max_queue
        self.positions = positions
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # batches: started by an idle worker; joined: rows that joined a running batch; steps: decode
        # forward passes (continuous batching); largest_batch: most rows running at once
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "rows_cancelled": 0, "largest_batch": 0, "running_rows": 0, "errors": 0,
                      "joined": 0, "steps": 0, "prefix_hits": 0}
        # prompt starts (chat template, system prompt) run once and reused by later requests
        self.prefixes = PrefixCache()

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
                if not job.admitted:  # a job partly running finishes those rows, then gets an error
                    job.cancel()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def queued_rows(self) -> int:
        with self._cv:
            return sum(len(j.rows) - j.admitted for j in self._queue if not j.cancelled)

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full (the caller answers 429)."""
        self.start()
        with self._cv:
            if sum(len(j.rows) - j.admitted for j in self._queue) + len(job.rows) > self.max_queue:
                return False
            job.submitted_at, job.submitted_step = time.monotonic(), self.stats["steps"]
            self._queue.append(job)
            self.stats["requests"] += 1
            self._cv.notify()
        return True

    # --- the worker ----------------------------------------------------------------------------

    def _wait(self) -> None:
        """Block until a job is queued, then up to ``batch_wait`` for ``max_batch`` rows (call with the lock held)."""
        while not self._stopping and not any(not j.cancelled for j in self._queue):
            self._queue.clear()
            self._cv.wait()
        end = time.monotonic() + self.batch_wait
        while not self._stopping and sum(len(j.rows) - j.admitted for j in self._queue if not j.cancelled) < self.max_batch:
            left = end - time.monotonic()
            if left <= 0:
                break
            self._cv.wait(left)

    def _take(self) -> list[Job]:
        """Static batching: whole queued jobs, up to ``max_batch`` rows (always at least one job)."""
        with self._cv:
            self._wait()
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

    def _take_rows(self, room: int, wait: bool) -> list[tuple[Job, list[Row]]]:
        """Continuous batching: queued rows, FIFO, up to ``room`` (a job bigger than the room is
        split: its first rows now, the rest when rows free up); ``wait`` as an idle worker does."""
        with self._cv:
            if wait:
                self._wait()
            taken: list[tuple[Job, list[Row]]] = []
            while self._queue and room > 0:
                j = self._queue[0]
                if j.cancelled:
                    self._queue.popleft()
                    continue
                k = min(room, len(j.rows) - j.admitted)
                taken.append((j, j.rows[j.admitted : j.admitted + k]))
                j.admitted += k
                room -= k
                if j.admitted == len(j.rows):
                    self._queue.popleft()
            return taken

    def _loop(self) -> None:
        while True:
            if self.continuous:
                taken = self._take_rows(self.max_batch, wait=True)
                jobs = list(dict.fromkeys(j for j, _ in taken))
                if not jobs and not self._stopping:
                    continue
            else:
                jobs = self._take()
            if self._stopping:
                for j in jobs:
                    _safe_emit(j, ("error", RuntimeError("the server is shutting down")))
                return
            if self.continuous:
                self._run_continuous(taken)
            else:
                self._run(jobs)

    def _run_continuous(self, taken: list[tuple[Job, list[Row]]]) -> None:
        """One running batch, from idle to idle: queued rows join between decode steps while there is room."""
        self.stats["batches"] += 1
        running: list[Job] = []  # jobs with rows in the engine or still queued
        try:
            with DecodeEngine(self.model, positions=self.positions, on_token=self._on_token, trim=True, prefixes=self.prefixes) as engine:
                self._admit(engine, taken, running)
                while engine.rows:
                    before = engine.steps
                    try:
                        done = engine.step()
                    except Exception as e:  # the batch's state is lost: every unfinished job fails
                        self.stats["errors"] += 1
                        for j in running:
                            if len(j.results) < len(j.rows):
                                j.cancel()  # rows of it still queued are dropped
                                _safe_emit(j, ("error", e))
                        return
                    self.stats["steps"] += engine.steps - before
                    self.stats["prefix_hits"] = self.prefixes.hits
                    for c in done:
                        self._on_complete(c)
                    running = [j for j in running if len(j.results) < len(j.rows)]
                    self.stats["running_rows"] = len(engine.rows)
                    room = self.max_batch - len(engine.rows)
                    if room > 0 and not self._stopping and engine.can_join:
                        more = self._take_rows(room, wait=False)
                        if more:
                            self._admit(engine, more, running, joined=bool(engine.rows))
        finally:
            self.stats["running_rows"] = 0

    def _admit(self, engine: DecodeEngine, taken: list[tuple[Job, list[Row]]], running: list[Job], joined: bool = False) -> None:
        """Prefill these rows into the engine; jobs that fail there (a request that slipped past
        validation) get their error and the running batch goes on."""
        rows = [r for _, rs in taken for r in rs]
        try:
            engine.add(rows, logprobs=[j.logprobs for j, rs in taken for _ in rs])
        except Exception as e:
            self.stats["errors"] += 1
            for j in dict.fromkeys(j for j, _ in taken):
                j.cancel()  # its other rows (running or queued) leave too
                _safe_emit(j, ("error", e))
                if j in running:
                    running.remove(j)
            return
        running.extend(j for j in dict.fromkeys(j for j, _ in taken) if j not in running)
        self.stats["rows"] += len(rows)
        if joined:
            self.stats["joined"] += len(rows)
        self.stats["running_rows"] = len(engine.rows)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(engine.rows))

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
        if job.first_token_at is None:
            job.first_token_at, job.first_token_step = time.monotonic(), self.stats["steps"]
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

