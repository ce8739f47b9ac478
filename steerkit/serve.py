"""A steered model behind an OpenAI-compatible chat API (FastAPI app factory).

Endpoints: ``POST /v1/chat/completions`` (streaming SSE and not; ``n``, ``max_tokens``,
``temperature``, ``top_p``, ``seed``, ``stop``, ``logprobs`` + ``top_logprobs``), ``GET /v1/models``,
``GET /health`` (with queue and batch counters). A request may carry ``steering``, a list of
``{"direction", "mode": add|clamp|ablate, "strength", "layer"?, "raw"?}``, which replaces the
server's default steering (``[]`` turns it off); the steering applied is echoed in a top-level
``steering`` field, and the seed used in ``seed``. Every request is handed to the
:class:`~steerkit.scheduler.Scheduler`, whose one worker thread batches concurrent requests
(continuous batching: a request joins the running batch at the next decode step).

Bad requests get OpenAI's error object ``{"error": {"message", "type", "param", "code"}}`` with
a 4xx status. Directions in requests are names looked up like ``steerkit generate`` does
(user folder, ``$STEERKIT_DIRECTIONS``, shipped); file paths only with ``allow_paths``.

What it leaves out: the legacy ``/v1/completions``, tools and response formats (ignored),
penalties (ignored), authentication (bind to loopback, the default).

Why one module of this size: the app factory, request validation and streaming share one request
type and one scheduler handle; split, they would pass both around.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from steerkit import __version__
from steerkit.directions import Direction
from steerkit.errors import SteerkitError
from steerkit.generate import Row, Sampling, chat_tokens
from steerkit.interventions import Intervention, Positions
from steerkit.models import LoadedModel
from steerkit.scheduler import ChoiceResult, Job, Scheduler
from steerkit.steering_spec import SteeringSpecError, parse_request_items, resolve_steering
from steerkit.steering_spec import is_finite_number as _finite
from steerkit.steering_spec import short_repr as _short

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 16  # rows per forward pass
    batch_wait: float = 0.05  # seconds an idle worker waits for more requests to batch
    max_queue: int = 256  # rows waiting; more gets 429
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256  # when a request gives none (capped by the context length)
    max_n: int = 64
    positions: Positions = "all"
    steering: tuple[Intervention, ...] = ()  # default for requests that send none
    allow_paths: bool = False  # let requests name direction files by path
    any_model: bool = False
    continuous: bool = True  # requests join the running batch between decode steps; False: static batches

    def __post_init__(self) -> None:
        for k in ("max_batch", "max_queue", "max_body_bytes", "default_max_tokens", "max_n"):
            if getattr(self, k) < 1:
                raise SteerkitError(f"--{k.replace('_', '-')} must be at least 1, got {getattr(self, k)}")
        if not (math.isfinite(self.batch_wait) and 0 <= self.batch_wait <= 10):
            raise SteerkitError(f"--batch-wait-ms must be from 0 to 10000, got {self.batch_wait * 1000:g}")


class APIError(Exception):
    """An error answered with OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    sampling: Sampling
    n: int
    stop: tuple[str, ...]
    logprobs: int | None
    stream: bool
    include_usage: bool
    steering: tuple[Intervention, ...]
    prompt_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)


# --- request parsing ---------------------------------------------------------------------------


def _check_strings(v: Any, where: str = "") -> None:
    """Refuse a lone surrogate anywhere in the body (a \\ud800 escape without its pair): not
    valid Unicode, and no tokenizer, file name or log takes it."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"{where or 'the body'} holds a lone surrogate (\\u{ord(v[e.start]):04x}), which is not valid Unicode", where or None, "invalid_unicode") from None
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_strings(k, where or "the body")
            _check_strings(x, f"{where}.{k}" if where else str(k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _check_strings(x, f"{where}[{i}]")


def _num(body: dict[str, Any], key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not _finite(v):
        raise APIError(400, f"{key} must be a finite number, got {_short(v)}", key)
    if v < lo or v > hi or (lo_open and v == lo):
        raise APIError(400, f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", key)
    return float(v)


def _int(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"{key} must be an integer, got {v!r}", key)
    if v < lo or (hi is not None and v > hi):
        raise APIError(400, f"{key} must be between {lo} and {hi}, got {v}" if hi is not None else f"{key} must be at least {lo}, got {v}", key)
    return v


def parse_messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    msgs = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role {m.get('role')!r} is not one of {', '.join(ROLES)} (or developer)", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        msgs.append({"role": role, "content": content})
    return msgs


class SteeringResolver:
    """Turns a request's steering items into Interventions (:func:`steerkit.steering_spec.resolve_steering`);
    caches directions by name so that requests naming the same direction share one slot of the
    batch's steering plan."""

    def __init__(self, model: LoadedModel, config: ServeConfig) -> None:
        self.model, self.config = model, config
        self.cache: dict[str, Direction] = {iv.direction.name: iv.direction for iv in config.steering}

    def parse(self, raw: Any) -> tuple[Intervention, ...]:
        if raw is None:
            return self.config.steering
        try:
            return resolve_steering(self.model, parse_request_items(raw, self.model.n_layers), any_model=self.config.any_model, cache=self.cache,
                                    allow_paths=self.config.allow_paths)
        except SteeringSpecError as e:
            raise APIError(400, str(e), e.param, e.code) from None


def parse_request(body: Any, model: LoadedModel, config: ServeConfig, resolver: SteeringResolver) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _check_strings(body)
    if "messages" not in body:
        raise APIError(400, "missing required parameter: messages", "messages", "missing_required_parameter")
    msgs = parse_messages(body["messages"])
    n = _int(body, "n", 1, 1, config.max_n)
    temperature = _num(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = _int(body, "seed", None, -(2**63), 2**63 - 1)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, None, 1)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        stops = tuple(s for s in stop if s)
    else:
        raise APIError(400, "stop must be a string or a list of up to 16 strings", "stop")
    want_lp = body.get("logprobs") or False
    if not isinstance(want_lp, bool):
        raise APIError(400, "logprobs must be true or false", "logprobs")
    top = _int(body, "top_logprobs", None, 0, 20)
    if top is not None and not want_lp:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    steering = resolver.parse(body.get("steering"))

    ids = chat_tokens(model, msgs)
    limit = model.context_length
    room = limit - len(ids)
    if max_tokens is None:
        max_tokens = min(config.default_max_tokens, room)
    if max_tokens < 1 or len(ids) + max_tokens > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested {len(ids) + max(max_tokens, 1)} tokens "
            f"({len(ids)} in the messages, {max(max_tokens, 1)} in the completion). Please reduce the length of the messages or completion.",
            "messages",
            "context_length_exceeded",
        )
    if seed is None:
        seed = secrets.randbits(31)
    try:
        sampling = Sampling(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    except SteerkitError as e:
        raise APIError(400, str(e)) from None
    return ChatRequest(msgs, sampling, n, stops, (top or 0) if want_lp else None, stream, bool(opts.get("include_usage")), steering, len(ids))


# --- responses ---------------------------------------------------------------------------------


class _TokenText:
    """Token id -> (text, bytes) for logprobs; byte-level BPE tokens give their exact bytes."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        try:
            from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

            self.byte_of = {c: b for b, c in bytes_to_unicode().items()}
        except ImportError:  # pragma: no cover
            self.byte_of = {}
        self.memo: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, t: int) -> tuple[str, list[int]]:
        if t not in self.memo:
            text = self.tok.decode([t])
            piece = self.tok.convert_ids_to_tokens(t)
            if isinstance(piece, str) and piece and all(c in self.byte_of for c in piece):
                b = [self.byte_of[c] for c in piece]
            else:
                b = list(text.encode("utf-8"))
            self.memo[t] = (text, b)
        return self.memo[t]


def logprobs_object(r: ChoiceResult, tt: _TokenText) -> dict[str, Any] | None:
    if r.logprobs is None:
        return None
    content = []
    for j, (t, lp) in enumerate(zip(r.token_ids, r.logprobs)):
        text, b = tt(t)
        tops = r.top_logprobs[j] if r.top_logprobs else []
        content.append({"token": text, "logprob": lp, "bytes": b, "top_logprobs": [{"token": tt(a)[0], "logprob": v, "bytes": tt(a)[1]} for a, v in tops]})
    return {"content": content, "refusal": None}


def _usage(req: ChatRequest, results: Sequence[ChoiceResult]) -> dict[str, int]:
    c = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": req.prompt_tokens, "completion_tokens": c, "total_tokens": req.prompt_tokens + c}


# --- the app -----------------------------------------------------------------------------------


def create_app(model: LoadedModel, config: ServeConfig = ServeConfig()) -> FastAPI:
    """The FastAPI app serving ``model`` (a LoadedModel). Its worker starts with the first request
    (or at startup under a server that runs lifespan events) and stops at shutdown."""
    sched = Scheduler(model, max_batch=config.max_batch, max_queue=config.max_queue, positions=config.positions, batch_wait=config.batch_wait,
                      continuous=config.continuous)
    resolver = SteeringResolver(model, config)
    tt = _TokenText(model.tokenizer)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        sched.start()
        try:
            yield
        finally:
            await asyncio.to_thread(sched.stop)

    app = FastAPI(title="steerkit", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = sched
    app.state.model = model

    def error_response(e: APIError) -> Any:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> Any:
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> Any:
        return error_response(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(SteerkitError)
    async def _steerkit_error(request: Request, e: SteerkitError) -> Any:
        # the library's one-line errors are about the request (checks the parser did not repeat)
        return error_response(APIError(400, str(e)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> Any:
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model.name, "batching": "continuous" if config.continuous else "static", "queued_rows": sched.queued_rows(), **sched.stats}

    def model_card() -> dict[str, Any]:
        return {"id": model.name, "object": "model", "created": created, "owned_by": "steerkit"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str) -> dict[str, Any]:
        if model_id != model.name:
            raise APIError(404, f"The model {model_id!r} does not exist; this server serves {model.name!r}", "model", "model_not_found")
        return model_card()

    async def read_body(request: Request) -> bytes:
        limit = config.max_body_bytes
        too_big = APIError(413, f"request body is larger than {limit} bytes (the server's --max-body-bytes)", code="request_too_large")
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        raw = await read_body(request)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request: {e}", code="invalid_json") from None
        req = parse_request(body, model, config, resolver)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

        def emit(ev: tuple[Any, ...]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ev)

        rows = [Row(req.messages, 0, k, req.steering, sampling=req.sampling) for k in range(req.n)]
        job = Job(rows, emit, stop=req.stop, logprobs=req.logprobs, stream=req.stream)
        if not sched.submit(job):
            raise APIError(429, "the server's queue is full; retry shortly", type="rate_limit_error", code="queue_full")
        cid = f"chatcmpl-{secrets.token_hex(12)}"
        head = {"id": cid, "created": int(time.time()), "model": model.name, "system_fingerprint": f"steerkit-{__version__}"}
        steering = [iv.describe() for iv in req.steering]
        if req.stream:
            return StreamingResponse(_sse(job, events, req, head, steering), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=0.5)
                    break
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return JSONResponse({}, status_code=499)
        except BaseException:
            job.cancel()
            raise
        if ev[0] == "error":
            raise APIError(500, f"generation failed: {ev[1]}", type="server_error")
        results: list[ChoiceResult] = ev[1]
        choices = [
            {"index": r.index, "message": {"role": "assistant", "content": r.text}, "logprobs": logprobs_object(r, tt), "finish_reason": r.finish_reason}
            for r in results
        ]
        return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(req, results), "steering": steering, "seed": req.sampling.seed}

    async def _sse(job: Job, events: asyncio.Queue, req: ChatRequest, head: dict[str, Any], steering: list[dict[str, Any]]) -> AsyncIterator[str]:
        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": choices, **extra}, ensure_ascii=False) + "\n\n"

        try:
            first = [{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None} for k in range(req.n)]
            yield chunk(first, steering=steering, seed=req.sampling.seed)
            while True:
                ev = await events.get()
                if ev[0] == "delta":
                    yield chunk([{"index": ev[1], "delta": {"content": ev[2]}, "logprobs": None, "finish_reason": None}])
                elif ev[0] == "error":
                    yield "data: " + json.dumps(APIError(500, f"generation failed: {ev[1]}", type="server_error").body()) + "\n\n"
                    return
                else:
                    results: list[ChoiceResult] = ev[1]
                    # logprobs of the whole choice come with its last chunk
                    last = [{"index": r.index, "delta": {}, "logprobs": logprobs_object(r, tt), "finish_reason": r.finish_reason} for r in results]
                    yield chunk(last, steering=steering)
                    if req.include_usage:
                        yield chunk([], usage=_usage(req, results))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            job.cancel()  # a client that went away frees its rows at their next token

    return app
