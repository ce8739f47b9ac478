"""Model diffing and contrastive extraction: rank SAE latents by how much a change switches
them on, and keep every number for scripts.

Two conditions are compared over the same prompts:

* model diffing: base model vs. tuned model (:func:`diff_models`);
* contrastive: one model under a positive vs. a negative system prompt (:func:`diff_contrast`).

For each condition we take the SAE's latent activations at one layer on the chosen tokens
(position 0, the attention sink, always excluded) and the plain residual means. Rankings
(``rank_by``):

* ``delta``       mean activation after minus before (the persona-features paper's ranking);
* ``normalized``  delta divided by the latent's spread under the first condition plus its mean,
                  so dense, high-magnitude latents stop dominating (design.md);
* ``cosine``      cosine between the latent's decoder row and the residual difference of means;
* ``attribution`` delta times the gradient of a misalignment signal along the decoder row
                  (OpenAI's follow-up note). With answer pairs (:func:`misalignment_gradient`)
                  the signal is the base model's mean log-probability of the misaligned answers
                  minus that of the aligned ones, and its gradient with respect to the residual
                  at the layer is averaged over tokens; without them a first-order stand-in
                  uses the residual difference of means as the gradient
                  (``delta_i * (W_dec[i] . dmean)``). Records say which was used. The
                  attribution of judged answers (misaligned vs aligned answers of one model to
                  the same questions, as `steerkit extract --judged` ranks) is
                  :mod:`steerkit.attribution`.

Latent sets (:func:`parse_latents`, :func:`latent_weights`, :func:`steerkit.sae.latent_set_vector`): the top N
of a ranking or a list of ids, weighted by a ranking's numbers, as one direction of kind
``sae-latents`` (see :mod:`steerkit.directions`).

Dense latents (firing on more than ``dense_threshold`` of first-condition tokens) are flagged
and ranked last unless ``keep_dense``. What it leaves out: picking the persona, which is the
causal screen's job (`steerkit screen`).

Why one module of this size: model diffing and contrastive extraction share the per-latent
statistics, the ranking and the record they return.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import torch

from steerkit.activations import pad_left, residuals, stat_mask
from steerkit.chat import Messages, chat_tokens
from steerkit.errors import SteerkitError
from steerkit.models import LoadedModel, bridge_hooks
from steerkit.sae import latent_set_vector  # noqa: F401 - re-exported: the latent set's vector is steerkit.sae's

RankBy = Literal["delta", "normalized", "cosine", "attribution"]
RANKINGS: tuple[str, ...] = get_args(RankBy)
Tokens = Literal["prompt", "answer", "all"]


@dataclass
class Side:
    """Per-latent statistics of one condition over its tokens."""

    mean: torch.Tensor  # (d_sae,) mean activation
    freq: torch.Tensor  # (d_sae,) fraction of tokens where the latent fires
    std: torch.Tensor  # (d_sae,)
    resid_mean: torch.Tensor  # (d_model,) mean residual
    n_tokens: int


@dataclass(frozen=True)
class LatentRow:
    latent: int
    rank: int
    score: float
    mean_before: float
    mean_after: float
    delta: float
    normalized: float
    cosine: float
    attribution: float
    freq_before: float
    freq_after: float
    dense: bool


@dataclass
class Extraction:
    """Everything a diff computed: ranked latents, the condition statistics, the mean diff."""

    rows: list[LatentRow]
    before: Side = field(repr=False)
    after: Side = field(repr=False)
    resid_diff: torch.Tensor = field(repr=False)  # (d_model,) mean after - mean before
    layer: int = 0
    rank_by: str = "delta"
    meta: dict[str, Any] = field(default_factory=dict)

    def top(self, k: int) -> list[LatentRow]:
        return self.rows[:k]

    def to_json(self, top: int | None = None) -> dict[str, Any]:
        return {
            **self.meta,
            "layer": self.layer,
            "rank_by": self.rank_by,
            "tokens_before": self.before.n_tokens,
            "tokens_after": self.after.n_tokens,
            "resid_diff_norm": float(self.resid_diff.norm()),
            "latents": [asdict(r) for r in (self.rows if top is None else self.rows[:top])],
        }


def _token_mask(am: torch.Tensor, prompt_lens: Sequence[int], tokens: Tokens) -> torch.Tensor:
    """[B, T] bool: usable positions (left padded), restricted to prompt or answer tokens."""
    m = stat_mask(am)
    if tokens == "all":
        return m
    T = am.shape[1]
    lens = am.sum(-1)
    sel = torch.zeros_like(m)
    for b, pl in enumerate(prompt_lens):
        start = T - int(lens[b])
        if tokens == "prompt":
            sel[b, start : start + pl] = True
        else:
            sel[b, start + pl :] = True
    return m & sel


@torch.inference_mode()
def side_stats(
    model: LoadedModel,
    sae: Any,
    layer: int,
    chats: Sequence[Messages],
    answers: Sequence[str] | None = None,
    tokens: Tokens = "prompt",
    batch_size: int = 8,
) -> Side:
    """Latent and residual statistics of ``model`` on ``chats`` (optionally teacher-forcing
    ``answers`` after each chat) at ``layer``."""
    if answers is not None and len(answers) != len(chats):
        raise SteerkitError(f"{len(answers)} answers for {len(chats)} prompts")
    if tokens != "prompt" and answers is None:
        raise SteerkitError("answer tokens need answers: give --answers or use prompt tokens")
    seqs, plens = [], []
    for i, msgs in enumerate(chats):
        p = chat_tokens(model, msgs)
        a = model.tokenizer(answers[i], add_special_tokens=False)["input_ids"] if answers is not None else []
        seqs.append(p + list(a))
        plens.append(len(p))
    d_sae = int(sae.W_dec.shape[0])
    s1 = torch.zeros(d_sae, dtype=torch.float64)
    s2 = torch.zeros(d_sae, dtype=torch.float64)
    fired = torch.zeros(d_sae, dtype=torch.float64)
    r1 = torch.zeros(model.d_model, dtype=torch.float64)
    n = 0
    for i in range(0, len(seqs), batch_size):
        ids, am = pad_left(seqs[i : i + batch_size], model.pad_token_id())
        x = residuals(model, ids, layer, am)  # (B, T, D)
        mask = _token_mask(am, plens[i : i + batch_size], tokens).to(x.device)
        xs = x[mask]  # (N, D)
        if xs.shape[0] == 0:
            continue
        a = sae.encode(xs.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)).double().cpu()  # (N, d_sae)
        s1 += a.sum(0)
        s2 += (a * a).sum(0)
        fired += (a > 0).double().sum(0)
        r1 += xs.double().sum(0).cpu()
        n += xs.shape[0]
    if n == 0:
        raise SteerkitError("no tokens to measure: prompts too short, or no answer tokens")
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp(min=0)
    return Side(mean=mean.float(), freq=(fired / n).float(), std=var.sqrt().float(), resid_mean=(r1 / n).float(), n_tokens=n)


def rank_latents(
    before: Side,
    after: Side,
    sae: Any,
    rank_by: RankBy = "delta",
    dense_threshold: float = 0.3,
    keep_dense: bool = False,
    grad: torch.Tensor | None = None,
) -> tuple[list[LatentRow], torch.Tensor]:
    if rank_by not in RANKINGS:
        raise SteerkitError(f"--rank-by {rank_by!r} is not one of {', '.join(RANKINGS)}")
    delta = after.mean - before.mean
    normalized = delta / (before.std + before.mean + 1e-3)
    dmean = after.resid_mean - before.resid_mean
    W = sae.W_dec.detach().float().cpu()
    Wn = W / W.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    cosine = Wn @ (dmean / dmean.norm().clamp(min=1e-8))
    attribution = delta * (W @ (grad.float().cpu() if grad is not None else dmean))
    scores = {"delta": delta, "normalized": normalized, "cosine": cosine, "attribution": attribution}[rank_by]
    dense = before.freq > dense_threshold
    key = scores.clone()
    if not keep_dense:
        key[dense] = -math.inf
    order = torch.argsort(key, descending=True, stable=True)
    rows = [
        LatentRow(
            latent=int(i),
            rank=r + 1,
            score=float(scores[i]),
            mean_before=float(before.mean[i]),
            mean_after=float(after.mean[i]),
            delta=float(delta[i]),
            normalized=float(normalized[i]),
            cosine=float(cosine[i]),
            attribution=float(attribution[i]),
            freq_before=float(before.freq[i]),
            freq_after=float(after.freq[i]),
            dense=bool(dense[i]),
        )
        for r, i in enumerate(order.tolist())
    ]
    return rows, dmean


def diff_models(
    base: Any,
    tuned: Any,
    sae: Any,
    layer: int,
    chats: Sequence[Messages],
    answers: Sequence[str] | None = None,
    tokens: Tokens = "prompt",
    rank_by: RankBy = "delta",
    batch_size: int = 8,
    grad: torch.Tensor | None = None,
    **rank_kw: Any,
) -> Extraction:
    """Rank latents by how much ``tuned`` raises them over ``base`` on the same tokens.

    ``grad`` (from :func:`misalignment_gradient`) makes ``attribution`` use a real gradient."""
    if base.d_model != tuned.d_model:
        raise SteerkitError(f"base d_model {base.d_model} differs from tuned d_model {tuned.d_model}")
    check_sae_fits(sae, base)
    before = side_stats(base, sae, layer, chats, answers, tokens, batch_size)
    after = side_stats(tuned, sae, layer, chats, answers, tokens, batch_size)
    rows, dmean = rank_latents(before, after, sae, rank_by, grad=grad, **rank_kw)
    meta = {"mode": "models", "base": base.name, "tuned": getattr(tuned, "source", tuned.name), "prompts": len(chats), "tokens": tokens,
            "attribution_gradient": "log-prob difference" if grad is not None else "difference of means (first order)"}
    return Extraction(rows, before, after, dmean, layer, rank_by, meta)


def diff_contrast(
    model: LoadedModel,
    sae: Any,
    layer: int,
    pairs: Sequence[tuple[str, str]],
    questions: Sequence[str],
    rank_by: RankBy = "delta",
    tokens: Tokens = "prompt",
    answers: tuple[Sequence[str], Sequence[str]] | None = None,
    batch_size: int = 8,
    **rank_kw: Any,
) -> Extraction:
    """Rank latents by how much positive system prompts raise them over negative ones."""
    check_sae_fits(sae, model)
    neg = [[{"role": "system", "content": n}, {"role": "user", "content": q}] for _, n in pairs for q in questions]
    pos = [[{"role": "system", "content": p}, {"role": "user", "content": q}] for p, _ in pairs for q in questions]
    # user-question tokens only would be fairer to compare; the system prompts differ in length,
    # so prompt tokens include the system text itself: that is part of the persona signal
    a_neg, a_pos = answers if answers is not None else (None, None)
    before = side_stats(model, sae, layer, neg, a_neg, tokens, batch_size)
    after = side_stats(model, sae, layer, pos, a_pos, tokens, batch_size)
    rows, dmean = rank_latents(before, after, sae, rank_by, **rank_kw)
    meta = {"mode": "contrast", "model": model.name, "pairs": len(pairs), "questions": len(questions), "tokens": tokens}
    return Extraction(rows, before, after, dmean, layer, rank_by, meta)


def check_sae_fits(sae: Any, model: LoadedModel) -> None:
    d_in = int(sae.W_dec.shape[1])
    if d_in != model.d_model:
        raise SteerkitError(f"the SAE reads d_in {d_in}, but {model.name} has d_model {model.d_model}")


def best_latent_set(dmean: torch.Tensor, sae: Any, k: int = 8, candidates: Sequence[int] | None = None) -> tuple[list[int], torch.Tensor, float]:
    """Greedy pursuit: the ``k`` decoder rows whose least-squares combination best rebuilds
    the residual difference of means. Returns (latents, weights, cosine of the fit)."""
    W = sae.W_dec.detach().float().cpu()
    pool = list(range(W.shape[0])) if candidates is None else list(candidates)
    chosen: list[int] = []
    target = dmean.float()
    resid = target.clone()
    weights = torch.zeros(0)
    for _ in range(k):
        sims = (W[pool] @ resid).abs()
        for j, c in enumerate(pool):
            if c in chosen:
                sims[j] = -1
        chosen.append(pool[int(sims.argmax())])
        A = W[chosen].T  # (D, k)
        weights = torch.linalg.lstsq(A, target[:, None]).solution[:, 0]
        resid = target - A @ weights
    fit = W[chosen].T @ weights
    cos = float(fit @ target / (fit.norm() * target.norm()).clamp(min=1e-8))
    return chosen, weights, cos


def logprob_grad(model: LoadedModel, layer: int, ids: torch.Tensor, am: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One forward pass of left-padded ``ids``: ``S = sum(weights * log p(token t+1 | ..t))``
    (``weights [B, T-1]``, one per predicted token) and its gradient with respect to the
    residual after block ``layer``. Returns ``(grad [B, T, D], residual [B, T, D], S)``."""
    dev = model.device
    box: list[torch.Tensor] = []

    def grab(x: torch.Tensor, hook: Any = None) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        box.append(x)
        return x

    with bridge_hooks(model, [(layer, grab)]), torch.enable_grad():
        logits = model.hf_model(input_ids=ids.to(dev), attention_mask=am.to(dev),
                                position_ids=(am.cumsum(-1) - 1).clamp(min=0).to(dev), use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None].to(dev))[..., 0]  # (B, T-1)
        S = (logp * weights.to(logp.device)).sum()
        (grad,) = torch.autograd.grad(S, box[0])
    return grad, box[0].detach(), float(S.detach())


def misalignment_gradient(
    model: LoadedModel,
    layer: int,
    chats: Sequence[Messages],
    misaligned: Sequence[str],
    aligned: Sequence[str],
    batch_size: int = 4,
) -> torch.Tensor:
    """Mean gradient, over usable tokens, of S = mean log p(misaligned answer) - mean log
    p(aligned answer) with respect to the residual after block ``layer``: [d_model]."""
    if not (len(chats) == len(misaligned) == len(aligned)):
        raise SteerkitError("misalignment_gradient needs one misaligned and one aligned answer per prompt")
    total = torch.zeros(model.d_model, dtype=torch.float64)
    n_tok = 0
    for sign, answers in ((1.0, misaligned), (-1.0, aligned)):
        seqs, starts = [], []
        for msgs, a in zip(chats, answers):
            p = chat_tokens(model, msgs)
            ids = model.tokenizer(a, add_special_tokens=False)["input_ids"]
            seqs.append(p + list(ids))
            starts.append(len(p))
        for i in range(0, len(seqs), batch_size):
            ids, am = pad_left(seqs[i : i + batch_size], model.pad_token_id())
            T = ids.shape[1]
            w = torch.zeros(ids.shape[0], T - 1)
            for b, st in enumerate(starts[i : i + batch_size]):
                L = int(am[b].sum())
                first_answer = T - L + st  # position of the first answer token
                n_ans = T - first_answer
                if n_ans > 0:
                    w[b, first_answer - 1 :] = sign / (n_ans * len(chats))  # predictions of answer tokens
            g, _, _ = logprob_grad(model, layer, ids, am, w)
            mask = stat_mask(am).to(g.device)
            total += g[mask].double().sum(0).cpu()
            n_tok += int(mask.sum())
    return (total / max(n_tok, 1)).float()


def promoted_tokens(model: LoadedModel, sae: Any, latent: int, k: int = 8) -> list[str]:
    """Logit lens: the tokens a latent's decoder row promotes most through the final norm's
    weight and the unembedding."""
    w = sae.W_dec[latent].detach().float()
    norm = getattr(getattr(model.hf_model, "model", None), "norm", None)
    if norm is not None and getattr(norm, "weight", None) is not None:
        w = w.to(norm.weight.device) * norm.weight.detach().float()
    unembed = model.hf_model.get_output_embeddings().weight.detach()
    logits = unembed.float() @ w.to(unembed.device)  # (V,); float32 whatever the model's dtype
    ids = logits.topk(k).indices.tolist()
    return [model.tokenizer.decode([i]) for i in ids]


# --- latent sets ------------------------------------------------------------------------------

WEIGHT_BY: tuple[str, ...] = ("score", "attribution", "delta", "equal")


def parse_latents(text: str | None) -> tuple[int | None, list[int]]:
    """``--latents``: ``top:N`` -> (N, []); ``12,87`` -> (None, [12, 87]); None -> (1, []) (the top one)."""
    if text is None:
        return 1, []
    t = text.strip()
    if t.lower().startswith("top:"):
        n = t[4:].strip()
        if not n.isdigit() or int(n) < 1:
            raise SteerkitError(f"--latents {text!r}: N in top:N must be a whole number of at least 1 (e.g. top:30)")
        return int(n), []
    parts = [x.strip() for x in t.split(",")]
    try:
        ids = [int(x) for x in parts]
    except ValueError:
        raise SteerkitError(f"--latents {text!r}: give top:N or comma-separated latent ids (e.g. top:30 or 1022,87)") from None
    seen: set[int] = set()
    for i in ids:
        if i in seen:
            raise SteerkitError(f"--latents {text!r}: latent {i} is listed twice; list each latent once")
        seen.add(i)
    return None, ids


def check_latent_ids(ids: Sequence[int], d_sae: int, top: int | None = None) -> None:
    """Latent ids (or a top:N) against the SAE's width: one line naming the first bad one."""
    bad = [i for i in ids if not 0 <= i < d_sae]
    if bad:
        raise SteerkitError(f"unknown latent {bad[0]}: the SAE has {d_sae} latents (0 to {d_sae - 1})")
    if top is not None and top > d_sae:
        raise SteerkitError(f"--latents top:{top} asks for more latents than the SAE has ({d_sae})")


def latent_weights(rows: Sequence[LatentRow], ids: Sequence[int], weight_by: str = "score") -> list[float]:
    """One weight per latent from the ranking's rows (``score``: the --rank-by number;
    ``attribution``; ``delta``; ``equal``), scaled so the largest magnitude is 1.

    A weight carries the sign of the latent's ``delta``: adding the set moves each latent the way
    the fine-tune (or the misaligned answers) moved it, down for a latent that fell. ``score`` and
    ``attribution`` must be positive (a latent the ranking scores at or below zero works against
    the difference and does not belong in the set); ``delta`` is used as it is; ``equal`` is 1."""
    if weight_by not in WEIGHT_BY:
        raise SteerkitError(f"--weight-by {weight_by!r} is not one of {', '.join(WEIGHT_BY)}")
    if weight_by == "equal":
        return [1.0] * len(ids)
    by_id = {r.latent: r for r in rows}
    vals = []
    for i in ids:
        v, d = float(getattr(by_id[i], weight_by)), float(by_id[i].delta)
        if not (math.isfinite(v) and math.isfinite(d) and d != 0 and (weight_by == "delta" or v > 0)):
            what = f"{weight_by} {v:+.4g}" + ("" if weight_by == "delta" else f" and delta {d:+.4g}")
            raise SteerkitError(f"latent {i} has {what} (rank {by_id[i].rank}): weighting by {weight_by} needs a positive score "
                                f"and a non-zero delta; leave it out, take fewer with top:N, or use --weight-by equal")
        vals.append(v if weight_by == "delta" else math.copysign(v, d))
    top = max(abs(v) for v in vals)
    return [v / top for v in vals]
