"""Batched, steered generation with a KV cache: chat prompts in, completion records out.

Every row (prompt x sample) may carry its own interventions; rows with different strengths
share one forward pass (see :class:`~steerkit.interventions.SteeringPlan`). The loop is our own
rather than ``generate()`` so that steering is applied on the prompt and on every cached decode
step (the first generated token included), positions are masked per row under left padding,
finished rows leave the batch, and sampling uses one random generator per row, so a row's
output depends on ``seed``, its prompt and sample index, not on what else is in the batch
(up to float rounding between batch shapes).

Positions (``positions``): ``all`` steers every token but the first (the attention sink);
``prompt`` only prompt tokens; ``generated`` the last prompt token (whose output is the first
new token) and every generated token.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from steerkit.errors import SteerkitError
from steerkit.interventions import POSITIONS, Intervention, Positions, SteeringPlan, bridge_hook_count, steering

Messages = list[dict[str, str]]

# the record format of ``steerkit generate --json`` (README, "From the shell"): the major number
# changes when a field is removed or changes meaning; new fields keep it
RECORD_FORMAT = "steerkit.generate/1"


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


def chat_tokens(model: Any, messages: Messages) -> list[int]:
    """Token ids for a chat, ending with the assistant turn's opening."""
    tok = model.tokenizer
    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tok(text)["input_ids"])


def _sample(logits: torch.Tensor, s: Sampling, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,), one generator per row."""
    if s.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1:
        sp, si = probs.sort(dim=-1, descending=True)
        cum = sp.cumsum(-1)
        drop = cum - sp > s.top_p  # keep the smallest prefix whose mass reaches top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    # inverse-CDF sampling: one uniform number per row from that row's own generator
    # (much cheaper than torch.multinomial row by row over a 49k vocabulary)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens]).to(probs.device)
    cdf = probs.double().cumsum(-1)  # (B, V)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=probs.shape[-1] - 1)
    return idx[:, 0]


def _sample_rows(logits: torch.Tensor, ss: Sequence[Sampling], gens: Sequence[torch.Generator]) -> torch.Tensor:
    """:func:`_sample` with each row's own temperature and top_p (same numbers row for row)."""
    dev = logits.device
    temps = torch.tensor([x.temperature for x in ss], dtype=torch.float32, device=dev)
    greedy = temps == 0
    best = logits.argmax(-1)
    if bool(greedy.all()):
        return best
    probs = torch.softmax(logits.float() / torch.where(greedy, 1.0, temps)[:, None], dim=-1)
    top_p = torch.tensor([x.top_p for x in ss], dtype=torch.float32, device=dev)[:, None]
    if bool((top_p < 1).any()):
        sp, si = probs.sort(dim=-1, descending=True)
        drop = (sp.cumsum(-1) - sp > top_p) & (top_p < 1)
        probs = torch.zeros_like(probs).scatter(-1, si, sp.masked_fill(drop, 0.0))
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens]).to(dev)
    cdf = probs.double().cumsum(-1)  # (B, V)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=probs.shape[-1] - 1)
    return torch.where(greedy, best, idx[:, 0])


@dataclass
class _Batch:
    rows: list[Row]
    ids: list[list[int]]  # prompt ids per row
    gens: list[torch.Generator]
    seeds: list[int]
    out: list[list[int]] = field(default_factory=list)
    lps: list[list[float]] = field(default_factory=list)
    tops: list[list[list[tuple[int, float]]]] = field(default_factory=list)


# (row, new token id, all tokens so far); returning False (not None) ends that row: it leaves
# the batch with finish_reason "cancelled" (a server's disconnected client, a stop string)
TokenCallback = Callable[[Row, int, list[int]], "bool | None"]


def generate(
    model: Any,
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
    """
    if positions not in POSITIONS:
        raise SteerkitError(f"positions {positions!r} is not one of {', '.join(POSITIONS)}")
    if batch_size < 1:
        raise SteerkitError(f"--batch-size must be at least 1, got {batch_size}")
    results: list[Completion | None] = [None] * len(rows)
    prompt_ids = [chat_tokens(model, r.messages) for r in rows]
    limit = model.context_length
    for i, ids in enumerate(prompt_ids):
        max_new = (rows[i].sampling or sampling).max_new_tokens
        if len(ids) + max_new > limit:
            room = limit - len(ids)
            fix = f"lower --max-new-tokens to at most {room}, or shorten the prompt" if room >= 1 else "shorten the prompt"
            raise SteerkitError(
                f"prompt {rows[i].prompt_index} has {len(ids)} tokens; with --max-new-tokens "
                f"{max_new} that exceeds the context length {limit}: {fix}"
            )
    # longest prompts first: less padding within a batch
    order = sorted(range(len(rows)), key=lambda i: -len(prompt_ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seeds = [row_seed((rows[i].sampling or sampling).seed, rows[i].prompt_index, rows[i].sample_index) for i in idx]
        batch = _Batch(
            rows=[rows[i] for i in idx],
            ids=[prompt_ids[i] for i in idx],
            gens=[torch.Generator().manual_seed(s) for s in seeds],
            seeds=seeds,
        )
        for j, c in zip(idx, _generate_batch(model, batch, sampling, positions, stop, logprobs, on_token, sae_loader, ignore_eos)):
            results[j] = c
            if on_complete is not None:
                on_complete(c)
    return [c for c in results if c is not None]


@torch.inference_mode()
def _generate_batch(
    model: Any,
    batch: _Batch,
    s: Sampling,
    positions: Positions,
    stop: Sequence[str],
    logprobs: int | None,
    on_token: TokenCallback | None,
    sae_loader: Any,
    ignore_eos: bool = False,
) -> list[Completion]:
    dev = model.device
    B = len(batch.rows)
    pad = model.pad_token_id()
    eos = set() if ignore_eos else set(model.eos_token_ids())
    T = max(len(x) for x in batch.ids)
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    for b, ids in enumerate(batch.ids):
        input_ids[b, T - len(ids) :] = torch.tensor(ids)
        attn[b, T - len(ids) :] = 1
    input_ids, attn = input_ids.to(dev), attn.to(dev)
    plan = SteeringPlan.build([list(r.interventions) for r in batch.rows], sae_loader)

    # prefill positions: real tokens after each row's first one
    first = (attn.cumsum(-1) == 1) & (attn == 1)
    real_after_first = (attn == 1) & ~first
    if positions == "all" or positions == "prompt":
        prefill_mask = real_after_first
    else:  # generated: only the last prompt token, which yields the first new token
        prefill_mask = torch.zeros_like(real_after_first)
        prefill_mask[:, -1] = True
    step_on = positions != "prompt"

    out: list[list[int]] = [[] for _ in range(B)]
    lps: list[list[float]] = [[] for _ in range(B)]
    tops: list[list[list[tuple[int, float]]]] = [[] for _ in range(B)]
    finish = ["length"] * B
    alive = list(range(B))  # batch rows still generating, in cache order
    stop_texts = [t for t in stop if t]
    samp = [r.sampling or s for r in batch.rows]  # per-row sampling (all equal to s unless rows carry their own)
    max_new = max(x.max_new_tokens for x in samp)
    uniform = all((x.temperature, x.top_p) == (samp[0].temperature, samp[0].top_p) for x in samp)

    # the unwrapped twin is faster; the bridge path is kept when someone hooked the bridge themselves
    on_twin = getattr(model, "twin", None) is not None and bridge_hook_count(model) == 0
    net = model.twin if on_twin else model.hf_model
    cache_kw = _cache_kwarg(net)  # once per batch, not per decode step
    with steering(model, plan, twin=on_twin) as pm:
        pm.mask = prefill_mask
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        o = net(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        past = _cache_of(o)
        logits = o.logits[:, -1]
        cur_attn = attn
        gens = list(batch.gens)
        for step in range(max_new):
            if uniform:
                if logprobs is not None:
                    lp = torch.log_softmax(logits.float() / (samp[0].temperature or 1.0), dim=-1)
                nxt = _sample(logits, samp[0], gens)
            else:
                live = [samp[b] for b in alive]
                if logprobs is not None:
                    temps = torch.tensor([x.temperature or 1.0 for x in live], device=logits.device)[:, None]
                    lp = torch.log_softmax(logits.float() / temps, dim=-1)
                nxt = _sample_rows(logits, live, gens)
            keep: list[int] = []
            for k, b in enumerate(alive):
                t = int(nxt[k])
                if logprobs is not None:
                    lps[b].append(float(lp[k, t]))
                    if logprobs > 0:
                        v, i = lp[k].topk(logprobs)
                        tops[b].append([(int(a), float(c)) for a, c in zip(i.tolist(), v.tolist())])
                if t in eos:
                    finish[b] = "stop"
                    continue
                out[b].append(t)
                if on_token is not None and on_token(batch.rows[b], t, out[b]) is False:
                    finish[b] = "cancelled"
                    continue
                if stop_texts and _hit_stop(model, out[b], stop_texts):
                    finish[b] = "stop"
                    continue
                if len(out[b]) >= samp[b].max_new_tokens:
                    continue  # finish "length"
                keep.append(k)
            if not keep or step == max_new - 1:
                break
            if len(keep) < len(alive):  # compact the batch: finished rows leave the cache
                sel = torch.tensor(keep, device=dev)
                past = _select_cache(past, sel)
                nxt = nxt[sel]
                cur_attn = cur_attn[sel]
                plan.keep_rows(torch.tensor(keep))
                gens = [gens[k] for k in keep]
                alive = [alive[k] for k in keep]
            cur_attn = torch.cat([cur_attn, torch.ones((len(alive), 1), dtype=cur_attn.dtype, device=dev)], dim=1)
            pos = (cur_attn.sum(-1, keepdim=True) - 1)
            pm.mask = torch.full((len(alive), 1), step_on, dtype=torch.bool, device=dev)
            o = net(input_ids=nxt[:, None], attention_mask=cur_attn, position_ids=pos, use_cache=True, **{cache_kw: past})
            past = _cache_of(o)
            logits = o.logits[:, -1]
    completions = []
    for b in range(B):
        ids = out[b]
        text = model.tokenizer.decode(ids, skip_special_tokens=True)
        if stop_texts:
            cut = min((text.find(t) for t in stop_texts if t in text), default=-1)
            if cut >= 0:
                text = text[:cut]
        completions.append(
            Completion(
                row=batch.rows[b],
                text=text,
                token_ids=ids,
                finish_reason=finish[b],
                seed=batch.seeds[b],
                prompt_tokens=len(batch.ids[b]),
                logprobs=lps[b] if logprobs is not None else None,
                top_logprobs=tops[b] if logprobs else None,
            )
        )
    return completions


def _cache_kwarg(net: torch.nn.Module) -> str:
    """The name the model's forward takes the KV cache by: ``cache`` from transformers 5.24 on
    (``past_key_values`` still works there, with a deprecation warning, until 5.40)."""
    import inspect

    return "cache" if "cache" in inspect.signature(net.forward).parameters else "past_key_values"


def _cache_of(output: Any) -> Any:
    """The KV cache a forward returned (``cache`` from transformers 5.24 on, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _hit_stop(model: Any, ids: list[int], stop: Sequence[str]) -> bool:
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


def as_messages(prompt: str, system: str | None = None) -> Messages:
    msgs: Messages = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": prompt})
    return msgs


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
