"""Batched, steered generation with a KV cache: chat prompts in, completion records out.

Every row (prompt x sample) may carry its own interventions; rows with different strengths
share one forward pass (see :class:`~steerkit.interventions.SteeringPlan`). The loop is our own
rather than ``generate()`` so that steering is applied on the prompt and on every cached decode
step (the first generated token included), positions are masked per row under left padding,
finished rows leave the batch, and sampling uses one random generator per row, so a row's
output depends on ``seed``, its prompt and sample index, not on what else is in the batch
(up to float rounding between batch shapes). The loop is :class:`DecodeEngine`'s: ``generate``
runs static batches on it, the server's scheduler lets rows join it between decode steps.

The prefill runs a prompt start that every row of a batch shares (the chat template and its
system prompt) once per distinct steering rather than once per row, and the decode steps run on
:mod:`steerkit.decode_kernels` (grouped attention, a KV cache that grows in place, the
unembedding in pieces); both give the same tokens as the plain path up to float rounding.

Positions (``positions``): ``all`` steers every token but the first (the attention sink);
``prompt`` only prompt tokens; ``generated`` the last prompt token (whose output is the first
new token) and every generated token.

Why one module of this size: the decode loop, its KV cache, per-row sampling and the continuous-
batching step share the live rows' state; splitting them would expose it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from steerkit.activations import pad_left, stat_mask
from steerkit.chat import Messages, as_messages, chat_tokens  # noqa: F401 - as_messages re-exported (its home is steerkit.chat)
from steerkit.decode_kernels import PrefixCache, cache_kwarg, cache_of, is_plain_layer, new_cache
from steerkit.errors import SteerkitError
from steerkit.interventions import POSITIONS, Intervention, PositionMask, Positions, SteeringPlan, bridge_hook_count, steering
from steerkit.models import LoadedModel

# the record format of ``steerkit generate --json`` (README, "From the shell"): the major number
# changes when a field is removed or changes meaning; new fields keep it
RECORD_FORMAT = "steerkit.generate/1"
# prompt starts shorter than this are prefilled per row (sharing them saves too little)
MIN_SHARED_PREFIX = 8
# top-p nuclei are looked for among this many most likely tokens first (see _nucleus)
NUCLEUS_K = 256


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SteerkitError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise SteerkitError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise SteerkitError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Row:
    """One completion to make."""

    messages: Messages
    prompt_index: int = 0
    sample_index: int = 0
    interventions: tuple[Intervention, ...] = ()
    tag: Any = None  # caller's own data, passed through to the Completion
    sampling: Sampling | None = None  # this row's own sampling (the server's requests); None: the call's


@dataclass
class Completion:
    row: Row
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS), "length", or "cancelled" (on_token returned False)
    seed: int
    prompt_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    def record(self, model_name: str, tuned: dict[str, str] | None = None, sampling: Sampling | None = None) -> dict[str, Any]:
        """The JSON record of ``steerkit generate``; ``tuned`` (a tuned model's folder and weights
        hash, :attr:`LoadedModel.tuned`) goes beside ``model``, the base's name; ``sampling`` (the
        call's settings; a row's own settings win) is stated so that files can be compared."""
        msgs = self.row.messages
        smp = self.row.sampling or sampling
        system = next((m["content"] for m in msgs if m["role"] == "system"), None)
        user = [m["content"] for m in msgs if m["role"] == "user"]
        return {
            "format": RECORD_FORMAT,
            "prompt": user[-1] if user else "",
            "system": system,
            "messages": msgs if len(msgs) > 2 or (len(msgs) == 2 and system is None) else None,
            "prompt_index": self.row.prompt_index,
            "sample": self.row.sample_index,
            "seed": self.seed,
            "interventions": [iv.describe() for iv in self.row.interventions],
            "model": model_name,
            **({"tuned": dict(tuned)} if tuned else {}),
            "completion": self.text,
            "tokens": self.n_tokens,
            "finish_reason": self.finish_reason,
            **({"sampling": {"temperature": smp.temperature, "top_p": smp.top_p, "max_new_tokens": smp.max_new_tokens,
                             "seed": smp.seed}} if smp is not None else {}),
        }


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    h = hashlib.sha256(f"{seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _sample(logits: torch.Tensor, sampling: Sampling | Sequence[Sampling], gens: Sequence[torch.Generator]) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,): each row with its own temperature and top_p (one
    :class:`Sampling` for every row, or one per row) and its own generator."""
    ss = [sampling] * logits.shape[0] if isinstance(sampling, Sampling) else sampling
    dev = logits.device
    temps = torch.tensor([x.temperature for x in ss], dtype=torch.float32, device=dev)
    greedy = temps == 0
    any_greedy = bool(greedy.any())
    best = logits.argmax(-1) if any_greedy else None
    if any_greedy and bool(greedy.all()):
        return best
    probs = torch.softmax(logits.float() / torch.where(greedy, 1.0, temps)[:, None], dim=-1)
    top_p = torch.tensor([x.top_p for x in ss], dtype=torch.float32, device=dev)[:, None]
    if bool((top_p < 1).any()):
        probs = _nucleus(probs, top_p)
    # inverse-CDF sampling: one uniform number per row from that row's own generator
    # (much cheaper than torch.multinomial row by row over a 49k vocabulary)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens]).to(dev)
    # (B, V): widening first and then summing is the same arithmetic as torch.cumsum(probs, dtype=float64)
    # (checked bit for bit in the tests) and 2.4x faster on CPU, where the fused form converts element by element
    cdf = probs.double().cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=probs.shape[-1] - 1)[:, 0]
    return torch.where(greedy, best, idx) if best is not None else idx


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``probs`` (B, V) with every token outside its row's top-p nucleus set to 0 (rows with
    ``top_p`` (B, 1) of 1 unchanged): the smallest set of most likely tokens whose mass reaches
    top_p. Sorting a 49k vocabulary per row per step cost as much as the decode step itself;
    the nucleus is found among each row's :data:`NUCLEUS_K` most likely tokens instead, and
    only rows whose nucleus reaches past those are sorted whole (the same tokens are kept,
    up to exact ties in probability at the nucleus's edge)."""
    def cut(sp: torch.Tensor, si: torch.Tensor, p: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        drop = sp.cumsum(-1) - sp > p  # keep the smallest prefix whose mass reaches top_p
        return torch.zeros_like(out).scatter(-1, si, sp.masked_fill(drop, 0.0))

    filt = top_p < 1
    k = min(NUCLEUS_K, probs.shape[-1])
    sp, si = probs.topk(k, dim=-1)
    # every token past the top k is dropped where the top k's mass already exceeds top_p (with room
    # for the rounding of a longer running sum)
    fits = (sp.sum(-1, keepdim=True) > top_p + 1e-5) | ~filt
    out = torch.where(filt, cut(sp, si, top_p, probs), probs)
    wide = (~fits[:, 0]).nonzero()[:, 0]
    if len(wide):
        sp, si = probs[wide].sort(dim=-1, descending=True)
        out[wide] = cut(sp, si, top_p[wide], probs[wide])
    return out


# (row, new token id, all tokens so far); returning False (not None) ends that row: it leaves
# the batch with finish_reason "cancelled" (a server's disconnected client, a stop string)
TokenCallback = Callable[[Row, int, list[int]], "bool | None"]


def generate(
    model: LoadedModel,
    rows: Sequence[Row],
    sampling: Sampling = Sampling(),
    *,
    batch_size: int = 8,
    positions: Positions = "all",
    stop: Sequence[str] = (),
    logprobs: int | None = None,
    on_token: TokenCallback | None = None,
    on_complete: Callable[[Completion], None] | None = None,
    sae_loader: Any = None,
    ignore_eos: bool = False,
) -> list[Completion]:
    """Generate a completion for every row, ``batch_size`` rows per forward pass.

    ``ignore_eos`` always generates ``max_new_tokens`` (for benchmarks that need equal lengths).
    A row with its own ``Row.sampling`` uses it (temperature, top_p, seed, max_new_tokens)
    instead of ``sampling``, so requests with different settings can share a batch.

    Batches are static here (each runs until its last row ends, then the next starts, and
    ``on_complete`` is called for a batch's rows in order once it ends); the decode loop is
    :class:`DecodeEngine`'s, which the server also drives with rows joining mid-batch.
    """
    if positions not in POSITIONS:
        raise SteerkitError(f"positions {positions!r} is not one of {', '.join(POSITIONS)}")
    if batch_size < 1:
        raise SteerkitError(f"--batch-size must be at least 1, got {batch_size}")
    results: list[Completion | None] = [None] * len(rows)
    prompt_ids = [chat_tokens(model, r.messages) for r in rows]
    for i, ids in enumerate(prompt_ids):
        check_context(model, rows[i], len(ids), (rows[i].sampling or sampling).max_new_tokens)
    # longest prompts first: less padding within a batch
    order = sorted(range(len(rows)), key=lambda i: -len(prompt_ids[i]))
    prefixes = PrefixCache()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        with DecodeEngine(model, sampling, positions=positions, stop=stop, on_token=on_token, sae_loader=sae_loader, ignore_eos=ignore_eos,
                          prefixes=prefixes) as engine:
            live = engine.add([rows[i] for i in idx], [prompt_ids[i] for i in idx], logprobs=logprobs)
            while engine.rows:
                engine.step()
        for j, lv in zip(idx, live):
            c = lv.completion
            assert c is not None
            results[j] = c
            if on_complete is not None:
                on_complete(c)
    return [c for c in results if c is not None]


def check_context(model: LoadedModel, row: Row, n_prompt: int, max_new: int) -> None:
    """Refuse a row whose prompt plus ``max_new`` tokens exceeds the model's context length."""
    limit = model.context_length
    if n_prompt + max_new > limit:
        room = limit - n_prompt
        fix = f"lower --max-new-tokens to at most {room}, or shorten the prompt" if room >= 1 else "shorten the prompt"
        raise SteerkitError(
            f"prompt {row.prompt_index} has {n_prompt} tokens; with --max-new-tokens "
            f"{max_new} that exceeds the context length {limit}: {fix}"
        )


@dataclass(eq=False)
class LiveRow:
    """A row in a :class:`DecodeEngine`: its prompt, sampler state and output so far."""

    row: Row
    ids: list[int]  # prompt ids
    sampling: Sampling
    seed: int
    gen: torch.Generator
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's and the top k
    joined_step: int = 0  # the engine's decode-step count when the row was prefilled
    out: list[int] = field(default_factory=list)
    lps: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    finish: str = "length"
    first_token_step: int | None = None  # the engine's decode-step count at the row's first token
    completion: Completion | None = None  # set when the row leaves


class _PlanView:
    """What :func:`~steerkit.interventions.steering` installs: hooks on every layer any row of
    the engine has steered so far, each applying the current plan (swapped as rows come and go)."""

    def __init__(self) -> None:
        self.plan = SteeringPlan(n_rows=0)
        self.hooked: set[int] = set()

    @property
    def empty(self) -> bool:
        return not self.hooked

    def layers(self) -> list[int]:
        return sorted(self.hooked)

    def apply(self, layer: int, x: torch.Tensor, pos_mask: torch.Tensor | None) -> torch.Tensor:
        return self.plan.apply(layer, x, pos_mask)


def _lpad(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """``x`` with ``n`` zeros in front along ``dim`` (a negative dim)."""
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _mergeable(past: Any) -> bool:
    """Whether rows' KV caches can be joined along the batch (plain growing per-layer caches)."""
    layers = getattr(past, "layers", None)
    return layers is not None and all(is_plain_layer(layer) for layer in layers)


class DecodeEngine:
    """The running batch of a decode loop: rows join (:meth:`add`, their prompts prefilled
    together and their KV cache merged into the running one) and leave (when done) between
    decode steps, each row with its own steering, sampling settings and random generator.

    ``generate`` adds a batch once and steps until it is empty; the server's scheduler adds
    requests whenever there is room (continuous batching). A row's tokens do not depend on
    when it joined or on its batch-mates: its prompt is prefilled with its own group, it is
    sampled with its own generator (seeded by :func:`row_seed`), steering is masked per row
    and per position, and its left padding is masked (up to float rounding between batch
    shapes). ``trim`` drops cache columns that became padding for every row (long-running
    batches whose early rows left).

    Use as a context manager (or call :meth:`close`): steering hooks stay installed from the
    first :meth:`add` until the engine closes.
    """

    def __init__(
        self,
        model: LoadedModel,
        sampling: Sampling = Sampling(),
        *,
        positions: Positions = "all",
        stop: Sequence[str] = (),
        on_token: TokenCallback | None = None,
        sae_loader: Any = None,
        ignore_eos: bool = False,
        trim: bool = False,
        prefixes: PrefixCache | None = None,
    ) -> None:
        if positions not in POSITIONS:
            raise SteerkitError(f"positions {positions!r} is not one of {', '.join(POSITIONS)}")
        self.model = model
        self.sampling = sampling
        self.positions = positions
        self.stop = [t for t in stop if t]
        self.on_token = on_token
        self.sae_loader = sae_loader
        self.eos = set() if ignore_eos else set(model.eos_token_ids())
        self.trim = trim
        self.prefixes = prefixes if prefixes is not None else PrefixCache()
        self.dev = model.device
        # the unwrapped twin is faster; the bridge path is kept when someone hooked the bridge themselves
        self.on_twin = getattr(model, "twin", None) is not None and bridge_hook_count(model) == 0
        self.net = model.twin if self.on_twin else model.hf_model
        self.cache_kw = cache_kwarg(self.net)  # once per engine, not per decode step
        self.step_on = positions != "prompt"
        self.rows: list[LiveRow] = []  # running rows, in cache order
        self.steps = 0  # decode forward passes run
        self._past: Any = None
        self._attn: torch.Tensor | None = None  # (B, T) long: 1 where the cache holds a real token
        self._logits: torch.Tensor | None = None  # (B, V): each running row's next-token logits
        self._mergeable = True
        self._view = _PlanView()
        self._pm = PositionMask()
        self._hooks = contextlib.ExitStack()

    # --- lifetime --------------------------------------------------------------------------------

    def __enter__(self) -> "DecodeEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the steering hooks and drop the cache (running rows are abandoned)."""
        self._hooks.close()
        self._view.hooked = set()
        self._reset()

    def _reset(self) -> None:
        self.rows = []
        self._past = self._attn = self._logits = None
        self._view.plan = SteeringPlan(n_rows=0)

    @property
    def can_join(self) -> bool:
        """Whether rows can be added now: always when empty, else when the model's KV cache can
        be merged (plain per-layer caches; not sliding-window or static ones)."""
        return not self.rows or self._mergeable

    def _hook(self, plan: SteeringPlan) -> None:
        need = set(plan.layers()) - self._view.hooked
        if not need:
            return
        self._hooks.close()  # reinstall on the union of layers (rare: a new layer's steering)
        self._view.hooked |= need
        self._hooks.enter_context(steering(self.model, self._view, self._pm, twin=self.on_twin))  # type: ignore[arg-type]

    # --- joining ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def add(self, rows: Sequence[Row], prompt_ids: Sequence[list[int]] | None = None, *, logprobs: int | None | Sequence[int | None] = None) -> list[LiveRow]:
        """Prefill ``rows`` (together, left-padded) and join them to the running batch; each
        gets its first token at the next :meth:`step`. ``logprobs`` for all or per row."""
        if not rows:
            return []
        if not self.can_join:
            raise SteerkitError("this model's KV cache cannot take rows into a running batch")
        ids_list = [list(x) for x in prompt_ids] if prompt_ids is not None else [chat_tokens(self.model, r.messages) for r in rows]
        wants = list(logprobs) if isinstance(logprobs, Sequence) else [logprobs] * len(rows)
        new: list[LiveRow] = []
        for r, ids, want in zip(rows, ids_list, wants):
            smp = r.sampling or self.sampling
            check_context(self.model, r, len(ids), smp.max_new_tokens)
            seed = row_seed(smp.seed, r.prompt_index, r.sample_index)
            new.append(LiveRow(r, ids, smp, seed, torch.Generator().manual_seed(seed), want, self.steps))
        plan = SteeringPlan.build([list(r.interventions) for r in rows], self.sae_loader)  # may refuse: nothing changed yet

        running = self._view.plan
        self._hook(plan)
        try:
            o, attn = self._prefill(rows, ids_list, plan)
        finally:
            self._view.plan = running
        T = attn.shape[1]
        past, logits = cache_of(o), o.logits[:, -1]
        if not self.rows:
            self._past, self._attn, self._logits, self._view.plan = past, attn, logits, plan
            self._mergeable = _mergeable(past)
        else:
            Tr = self._attn.shape[1]
            L = max(Tr, T)
            for a, b in zip(self._past.layers, past.layers):
                if not (a.is_initialized and b.is_initialized):
                    if a.is_initialized or b.is_initialized:  # pragma: no cover - KV-shared layers differ
                        raise SteerkitError("this model's KV cache cannot take rows into a running batch")
                    continue
                a.keys = torch.cat([_lpad(a.keys, L - Tr, -2), _lpad(b.keys, L - T, -2)])
                a.values = torch.cat([_lpad(a.values, L - Tr, -2), _lpad(b.values, L - T, -2)])
            self._attn = torch.cat([_lpad(self._attn, L - Tr, -1), _lpad(attn, L - T, -1)])
            self._logits = torch.cat([self._logits, logits])
            self._view.plan = running.concat(plan)
        self.rows.extend(new)
        return new

    def _prefill(self, rows: Sequence[Row], ids_list: list[list[int]], plan: SteeringPlan) -> tuple[Any, torch.Tensor]:
        """Run the new rows' prompts (steered by ``plan``); returns the output and the rows'
        (B, T) attention mask. A prompt start the rows share with each other or with earlier
        prompts (the chat template and its system prompt) is run once per distinct steering,
        or taken from :attr:`prefixes`, and its KV cache copied to each row:
        [shared start | left padding | rest of the prompt]."""
        dev = self.dev
        pad = self.model.pad_token_id()
        cache = new_cache(self.net) if self.on_twin else None
        P, group_of, starts = self._shared_prefix(rows, ids_list, cache)
        if P:
            missing = [g for g, kv in enumerate(starts) if kv is None]
            if missing:  # run the missing starts, one row per steering group
                firsts = [group_of.index(g) for g in missing]
                pre = torch.tensor([ids_list[i][:P] for i in firsts], device=dev)
                ones = torch.ones_like(pre)
                self._view.plan = SteeringPlan.build([list(rows[i].interventions) for i in firsts], self.sae_loader)
                self._pm.mask = stat_mask(ones) if self.positions != "generated" else torch.zeros_like(pre, dtype=torch.bool)
                o = self.net(input_ids=pre, attention_mask=ones, position_ids=torch.arange(P, device=dev).expand_as(pre),
                             use_cache=True, logits_to_keep=1, **{self.cache_kw: new_cache(self.net)})
                layers = cache_of(o).layers
                for j, (g, i) in enumerate(zip(missing, firsts)):
                    starts[g] = [(layer.keys[j : j + 1].clone(), layer.values[j : j + 1].clone()) for layer in layers]
                    self.prefixes.put(self._steer_key(rows[i]), ids_list[i][:P], starts[g], rows[i].interventions)
            pick = torch.tensor(group_of, device=dev)
            for n, layer in enumerate(cache.layers):  # each row gets its group's start
                k = torch.cat([st[n][0] for st in starts])[pick]
                v = torch.cat([st[n][1] for st in starts])[pick]
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
        for r, ids in zip(rows, ids_list):
            self.prefixes.remember(self._steer_key(r), ids)
        input_ids, tail = pad_left([x[P:] for x in ids_list], pad)
        input_ids, tail = input_ids.to(dev), tail.to(dev)
        attn = torch.cat([torch.ones((len(rows), P), dtype=tail.dtype, device=dev), tail], dim=1)
        if self.positions == "generated":  # only the last prompt token, which yields the first new token
            mask = torch.zeros_like(tail, dtype=torch.bool)
            mask[:, -1] = True
        else:  # real tokens after each row's first one (the attention sink)
            mask = stat_mask(attn)[:, P:]
        self._view.plan = plan
        self._pm.mask = mask
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)[:, P:]
        kw = {self.cache_kw: cache} if cache is not None else {}
        o = self.net(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=True, logits_to_keep=1, **kw)
        return o, attn

    def _steer_key(self, row: Row) -> tuple[Any, ...]:
        """What a prompt start's KV cache depends on besides its tokens: the row's steering
        (none with positions "generated", which leave the prompt unsteered)."""
        if self.positions == "generated" or not row.interventions:
            return ()
        return tuple((id(iv.direction), iv.mode, float(iv.strength), iv.raw, iv.layer, iv.on_latents) for iv in row.interventions)

    def _shared_prefix(self, rows: Sequence[Row], ids_list: list[list[int]], cache: Any) -> tuple[int, list[int], list[Any]]:
        """(P, each row's steering group, each group's stored start KV or None to run): the
        prompt start of P tokens to run once per group or take from :attr:`prefixes`; P = 0
        where no start of at least :data:`MIN_SHARED_PREFIX` tokens is worth sharing."""
        none: tuple[int, list[int], list[Any]] = (0, [], [])
        if cache is None or not all(is_plain_layer(layer) for layer in getattr(cache, "layers", [None])):
            return none
        self.prefixes.bind(self.net)
        shortest = min(len(x) for x in ids_list)
        first = ids_list[0]
        common = 0
        while common < shortest - 1 and all(x[common] == first[common] for x in ids_list):  # the last prompt token stays per row
            common += 1
        if common < MIN_SHARED_PREFIX:
            return none
        keys: dict[tuple[Any, ...], int] = {}
        group_of = [keys.setdefault(self._steer_key(r), len(keys)) for r in rows]
        reps = [ids_list[group_of.index(g)] for g in range(len(keys))]
        stored = [self.prefixes.find(k, ids, common) for k, ids in zip(keys, reps)]
        if all(n >= MIN_SHARED_PREFIX for n, _ in stored):  # every group's start was run before
            P = min(n for n, _ in stored)
            return P, group_of, [[(k[..., :P, :], v[..., :P, :]) for k, v in kv] for _, kv in stored]
        longest = max(len(x) for x in ids_list)
        if len(rows) >= 2 and len(keys) * common + len(rows) * (longest - common) <= 0.8 * len(rows) * longest:
            P = common  # shared within this batch: worth running once per group
        else:  # worth running once if earlier prompts began the same way (they will again)
            P = min(self.prefixes.seen(k, ids, common) for k, ids in zip(keys, reps))
            if P < MIN_SHARED_PREFIX:
                return none
        starts = [[(k[..., :P, :], v[..., :P, :]) for k, v in kv] if n >= P else None for n, kv in stored]
        return P, group_of, starts

    # --- one step --------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Completion]:
        """Sample every running row's next token (callbacks, stop strings, EOS, lengths), let
        finished rows leave, and run one decode forward pass for the rest. Returns the rows
        that finished in this step."""
        live = self.rows
        if not live:
            return []
        logits = self._logits
        assert logits is not None
        samp = [lv.sampling for lv in live]
        gens = [lv.gen for lv in live]
        want = any(lv.logprobs is not None for lv in live)
        if want:
            temps = torch.tensor([x.temperature or 1.0 for x in samp], device=logits.device)[:, None]
            lp = torch.log_softmax(logits.float() / temps, dim=-1)
        nxt = _sample(logits, samp, gens)
        keep: list[int] = []
        done: list[LiveRow] = []
        for k, lv in enumerate(live):
            t = int(nxt[k])
            if lv.first_token_step is None:
                lv.first_token_step = self.steps
            if lv.logprobs is not None:
                lv.lps.append(float(lp[k, t]))
                if lv.logprobs > 0:
                    v, i = lp[k].topk(lv.logprobs)
                    lv.tops.append([(int(a), float(c)) for a, c in zip(i.tolist(), v.tolist())])
            if t in self.eos:
                lv.finish = "stop"
            else:
                lv.out.append(t)
                if self.on_token is not None and self.on_token(lv.row, t, lv.out) is False:
                    lv.finish = "cancelled"
                elif self.stop and _hit_stop(self.model, lv.out, self.stop):
                    lv.finish = "stop"
                elif len(lv.out) < lv.sampling.max_new_tokens:
                    keep.append(k)
                    continue
                # else: finish "length"
            done.append(lv)
        completions = [self._complete(lv) for lv in done]
        if not keep:
            self._reset()
            return completions
        dev = self.dev
        if len(keep) < len(live):  # compact the batch: finished rows leave the cache
            sel = torch.tensor(keep, device=dev)
            self._past = _select_cache(self._past, sel)
            nxt = nxt[sel]
            self._attn = self._attn[sel]
            self._view.plan.keep_rows(torch.tensor(keep))
            self.rows = [live[k] for k in keep]
            if self.trim and self._mergeable:
                self._trim()
        attn = torch.cat([self._attn, torch.ones((len(self.rows), 1), dtype=self._attn.dtype, device=dev)], dim=1)
        pos = attn.sum(-1, keepdim=True) - 1
        self._pm.mask = torch.full((len(self.rows), 1), self.step_on, dtype=torch.bool, device=dev)
        o = self.net(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, use_cache=True, **{self.cache_kw: self._past})
        self._past, self._attn, self._logits = cache_of(o), attn, o.logits[:, -1]
        self.steps += 1
        return completions

    def _trim(self) -> None:
        """Drop leading cache columns that are padding for every running row."""
        assert self._attn is not None
        lead = int((self._attn.sum(0) == 0).long().cumprod(0).sum())
        if lead == 0:
            return
        for layer in self._past.layers:
            if layer.is_initialized:
                layer.keys = layer.keys[..., lead:, :]
                layer.values = layer.values[..., lead:, :]
        self._attn = self._attn[:, lead:]

    def _complete(self, lv: LiveRow) -> Completion:
        text = self.model.tokenizer.decode(lv.out, skip_special_tokens=True)
        if self.stop:
            cut = min((text.find(t) for t in self.stop if t in text), default=-1)
            if cut >= 0:
                text = text[:cut]
        lv.completion = Completion(
            row=lv.row,
            text=text,
            token_ids=lv.out,
            finish_reason=lv.finish,
            seed=lv.seed,
            prompt_tokens=len(lv.ids),
            logprobs=lv.lps if lv.logprobs is not None else None,
            top_logprobs=lv.tops if lv.logprobs else None,
        )
        return lv.completion


def _hit_stop(model: LoadedModel, ids: list[int], stop: Sequence[str]) -> bool:
    tail = model.tokenizer.decode(ids[-16:], skip_special_tokens=True)
    return any(t in tail for t in stop)


def _select_cache(past: Any, sel: torch.Tensor) -> Any:
    if hasattr(past, "batch_select_indices"):
        past.batch_select_indices(sel)
        return past
    if hasattr(past, "layers"):
        for layer in past.layers:
            layer.keys = layer.keys[sel]
            layer.values = layer.values[sel]
        return past
    raise SteerkitError("this model's KV cache cannot be compacted")  # pragma: no cover


# --- convenience ------------------------------------------------------------------------------


def make_rows(
    prompts: Iterable[Messages],
    n: int = 1,
    interventions: Sequence[Intervention] = (),
) -> list[Row]:
    """``n`` samples of every prompt, all with the same interventions."""
    return [
        Row(messages=list(m), prompt_index=p, sample_index=k, interventions=tuple(interventions))
        for p, m in enumerate(prompts)
        for k in range(n)
    ]


class Throughput:
    """Counts generated tokens per second, for progress displays and benchmarks."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = 0

    def add(self, n: int = 1) -> None:
        self.tokens += n

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.tokens / dt if dt > 0 else 0.0
