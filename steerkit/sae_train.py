"""Train an SAE on one residual layer of a model: packed token chunks -> activations -> SAE.

Pipeline:

1. documents from :mod:`steerkit.corpus`, split by a hash of their text into train and
   held-out parts (:func:`split_documents`; every ~50th document is held out), shuffled per
   epoch with the seed;
2. tokens packed into fixed-length chunks (no padding); chats rendered with the chat template;
3. activations at ``layer`` from :func:`steerkit.activations.residuals` (the forward stops at
   the layer), position 0 of every chunk dropped (the attention sink);
4. a buffer of ``buffer_tokens`` activations, shuffled, consumed in batches, refilled;
5. the SAE trained on inputs scaled to mean norm sqrt(d_in), unit-norm decoder rows, Adam with
   warm-up and a linear decay, an AuxK loss (top ``aux_k`` dead latents reconstruct the
   residual error) so latents do not die; at the end the scale is folded into the weights so
   the saved SAE reads raw activations.

Checkpoints are written at buffer boundaries (SAE, Adam moments, data position, all in
safetensors + JSON), so ``resume`` continues exactly where an uninterrupted run would be.
``topk``, ``relu`` (L1 penalty) and ``batchtopk`` SAEs are trained here; JumpReLU ones only
load. BatchTopK keeps the ``k x batch`` largest activations of a whole batch (``k`` per token on
average, more on some tokens, fewer on others) and learns a threshold (a running mean of the
smallest kept activation); it is saved as a JumpReLU SAE with that threshold on every latent,
so it reads one token at a time like any other (its ``cfg.json`` records ``steerkit.trained_as``).

Chat data, masking and exact mixing live in :mod:`steerkit.sae_chat` (``chats=``), differences
of a tuned and the base model in :mod:`steerkit.sae_diff` (``cfg.diff``, ``tuned=``); ``init=``
starts from an existing SAE's weights.

Why one module of this size: the training stages share one config and one checkpoint format, and
resuming needs all of them in one place.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from steerkit.activations import residuals
from steerkit.corpus import Document, doc_tokens, docs_tokens, read_documents
from steerkit.errors import SteerkitError
from steerkit.fsutil import atomic_path, atomic_write_text
from steerkit.models import LoadedModel
from steerkit.sae import SAE, new_sae, save_sae
from steerkit.sae_chat import ChatState, ChatStream, MixSource, mixed_batches, plan_mix, residual_acts
from steerkit.sae_diff import DiffActs

CKPT_DIR = "checkpoint"
CKPT_TENSORS = "state.safetensors"
CKPT_JSON = "state.json"
TRAIN_FILE = "training.json"


@dataclass(frozen=True)
class TrainConfig:
    layer: int
    d_sae: int = 4608
    k: int = 32
    architecture: str = "topk"
    tokens: int = 5_000_000
    batch_size: int = 4096
    lr: float = 4e-4
    l1_coeff: float = 5.0  # relu only, on scaled inputs
    context: int = 256  # tokens per packed chunk
    model_batch: int = 16  # chunks per forward pass
    buffer_tokens: int = 262_144
    passes: int = 1  # training passes over each buffer (reuses costly activations on a CPU)
    aux_k: int | None = None  # default d_in // 2
    aux_coeff: float = 1 / 32
    dead_tokens: int = 500_000  # a latent is dead after this many tokens without firing
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # the last part of training decays the lr linearly to 0
    holdout: int = 50  # every holdout-th document (by hash) is held out; 0: none
    seed: int = 0
    checkpoint_every: int = 1  # buffers between checkpoints
    # chat mixing and masking (steerkit.sae_chat); diff-SAEs (steerkit.sae_diff); fine-tuning an SAE
    chat_fraction: float = 0.0  # share of every batch's tokens from the chats
    drop_system: float = 0.0  # probability of dropping a conversation's system prompt
    mask_special: bool = False  # special tokens out of the activations (on with chats and diffs)
    diff: bool = False  # train on tuned - base residuals
    init: str | None = None  # the SAE the run started from (recorded)

    def __post_init__(self) -> None:
        if self.architecture not in ("topk", "relu", "batchtopk"):
            raise SteerkitError(f"training supports architectures topk, relu and batchtopk, not {self.architecture!r}")
        for name in ("chat_fraction", "drop_system"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0):
                raise SteerkitError(f"--{name.replace('_', '-')} must lie in [0, 1], got {v}")
        for name in ("d_sae", "tokens", "batch_size", "context", "model_batch", "buffer_tokens", "passes"):
            if getattr(self, name) <= 0:
                raise SteerkitError(f"{name} must be positive, got {getattr(self, name)}")
        if self.context < 2:
            raise SteerkitError("context must be at least 2 tokens (position 0 is dropped)")
        if self.architecture in ("topk", "batchtopk") and not 0 < self.k <= self.d_sae:
            raise SteerkitError(f"k must be between 1 and the number of latents ({self.d_sae}), got {self.k}")


# --- data -------------------------------------------------------------------------------------


def _doc_key(d: Document) -> int:
    return zlib.crc32(json.dumps(d, sort_keys=True, ensure_ascii=False).encode("utf-8"))


def split_documents(docs: Sequence[Document], part: str, holdout: int = 50) -> list[Document]:
    """``part="train"`` or ``"heldout"``: a document is held out when crc32(text) % holdout == 0."""
    if part not in ("train", "heldout", "all"):
        raise SteerkitError(f"split {part!r} is not one of train, heldout, all")
    if part == "all" or holdout <= 0:
        return list(docs) if part != "heldout" else []
    held = [_doc_key(d) % holdout == 0 for d in docs]
    return [d for d, h in zip(docs, held) if h == (part == "heldout")]


@dataclass
class StreamState:
    """Where a token stream stands: epoch, next document, tokens carried into the next chunk."""

    epoch: int = 0
    doc: int = 0
    carry: list[int] = field(default_factory=list)


class ChunkStream:
    """Endless fixed-length token chunks from shuffled documents (reshuffled every epoch)."""

    def __init__(self, model: LoadedModel, docs: Sequence[Document], context: int, seed: int, state: StreamState | None = None, cycle: bool = True) -> None:
        if not docs:
            raise SteerkitError("the corpus has no documents to train on")
        self.model, self.docs, self.context, self.seed, self.cycle = model, docs, context, seed, cycle
        self.state = state or StreamState()
        self._order: list[int] | None = None
        self.block = 256  # documents tokenized at once
        self._order_epoch = -1

    def _perm(self) -> list[int]:
        if self._order_epoch != self.state.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.state.epoch)
            self._order = torch.randperm(len(self.docs), generator=g).tolist()
            self._order_epoch = self.state.epoch
        assert self._order is not None
        return self._order

    def _refill(self) -> bool:
        """Tokenize the next block of documents into ``carry`` (batched: the fast tokenizer
        runs in parallel). False when a non-cycling stream has no documents left."""
        st = self.state
        if st.doc >= len(self.docs):
            if not self.cycle:
                return False
            st.epoch, st.doc = st.epoch + 1, 0
        order = self._perm()
        block = [self.docs[i] for i in order[st.doc : st.doc + self.block]]
        st.doc += len(block)
        for ids in docs_tokens(self.model, block):
            st.carry += ids
        return True

    def next_chunks(self, n: int) -> torch.Tensor | None:
        """Up to ``n`` chunks ``[n, context]`` (None when a non-cycling stream is exhausted)."""
        out: list[list[int]] = []
        st = self.state
        while len(out) < n:
            while len(st.carry) < self.context:
                if not self._refill():
                    break
            if len(st.carry) < self.context:
                break
            out.append(st.carry[: self.context])
            st.carry = st.carry[self.context :]
        if not out:
            return None
        return torch.tensor(out, dtype=torch.long)


def chunk_activations(model: LoadedModel, chunks: torch.Tensor, layer: int) -> torch.Tensor:
    """Activations of packed chunks ``[B, T]`` at ``layer``, position 0 dropped: ``[B*(T-1), D]``."""
    x = residuals(model, chunks, layer)  # (B, T, D)
    return x[:, 1:].reshape(-1, x.shape[-1])


def fill_buffer(model: LoadedModel, stream: ChunkStream, layer: int, n_tokens: int, model_batch: int, device: torch.device) -> torch.Tensor:
    """About ``n_tokens`` activations ``[N, D]`` from the stream."""
    per_chunk = stream.context - 1
    need = math.ceil(n_tokens / per_chunk)
    parts = []
    while need > 0:
        chunks = stream.next_chunks(min(model_batch, need))
        if chunks is None:
            break
        parts.append(chunk_activations(model, chunks, layer).to(device))
        need -= chunks.shape[0]
    if not parts:
        return torch.zeros((0, model.d_model), device=device)
    return torch.cat(parts)


# --- training ---------------------------------------------------------------------------------


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    refills: int = 0
    scale: float = 0.0  # inputs are multiplied by this during training
    stream: StreamState = field(default_factory=StreamState)
    last_fired: torch.Tensor | None = None  # (d_sae,) tokens seen when each latent last fired
    chat: Any = None  # steerkit.sae_chat.ChatState when training on chats
    threshold: float = 0.0  # batchtopk: running mean of the smallest kept activation (scaled units)
    chat_tokens: int = 0  # training tokens that came from chats


def _lr(cfg: TrainConfig, step: int, total_steps: int) -> float:
    f = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    decay_start = int(total_steps * (1 - cfg.decay_fraction))
    if step >= decay_start and total_steps > decay_start:
        f *= max(0.0, (total_steps - step) / (total_steps - decay_start))
    return cfg.lr * f


def _sparse_decode(W_dec: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """``sum_j vals[:, j] * W_dec[idx[:, j]]``: a TopK decode that touches k rows per token instead
    of multiplying a dense ``[B, d_sae]`` matrix (the same values and gradients, far fewer FLOPs)."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")


def train_step(sae: SAE, opt: torch.optim.Optimizer, x: torch.Tensor, cfg: TrainConfig, dead: torch.Tensor, lr: float,
               sparse: bool = True) -> dict[str, Any]:
    """One optimiser step on scaled inputs ``x [B, D]``. Returns loss terms and the fired mask.

    TopK SAEs decode sparsely (``sparse=True``, the k active rows of ``W_dec`` per token);
    ``sparse=False`` runs the dense reference computation."""
    pre = sae.pre_acts(x)  # (B, S)
    topk = cfg.architecture in ("topk", "batchtopk")
    kept_min = None
    if cfg.architecture == "batchtopk":
        # the batch's k x B largest activations, wherever they fall (k per token on average)
        flat = pre.relu().flatten()
        bvals, bidx = flat.topk(min(int(cfg.k) * pre.shape[0], flat.numel()))
        a = torch.zeros_like(flat).scatter(0, bidx, bvals).view_as(pre)
        x_hat = a @ sae.W_dec + sae.b_dec
        pos = bvals.detach()[bvals.detach() > 0]
        kept_min = float(pos.min()) if pos.numel() else None
        sparse = False  # AuxK below decodes densely
    elif topk and sparse:
        vals, idx = pre.topk(int(cfg.k), dim=-1)
        vals = vals.relu()
        x_hat = _sparse_decode(sae.W_dec, idx, vals) + sae.b_dec
        a = None
    else:
        a = sae.activate(pre)
        x_hat = a @ sae.W_dec + sae.b_dec
    e = x - x_hat
    var = (x - x.mean(0)).pow(2).sum(-1).mean()
    fvu = e.pow(2).sum(-1).mean() / var
    loss = fvu
    aux = torch.zeros((), device=x.device)
    n_dead = int(dead.sum())
    if topk and n_dead > 0:
        k_aux = min(cfg.aux_k or x.shape[1] // 2, n_dead)
        masked = pre.masked_fill(~dead[None, :], float("-inf"))
        avals, aidx = masked.topk(k_aux, dim=-1)
        if sparse:
            e_hat = _sparse_decode(sae.W_dec, aidx, avals.relu())
        else:
            e_hat = torch.zeros_like(pre).scatter_(-1, aidx, avals.relu()) @ sae.W_dec
        ed = e.detach()
        aux = (ed - e_hat).pow(2).sum(-1).mean() / (ed - ed.mean(0)).pow(2).sum(-1).mean().clamp(min=1e-12)
        loss = loss + cfg.aux_coeff * torch.nan_to_num(aux, 0.0)
    if cfg.architecture == "relu":
        loss = loss + cfg.l1_coeff * (a * sae.W_dec.norm(dim=-1)).sum(-1).mean() / var.sqrt()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        # keep decoder rows unit norm: drop the gradient along each row, renormalise after
        W, g = sae.W_dec, sae.W_dec.grad
        if g is not None:
            g -= (g * W).sum(-1, keepdim=True) * W
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        W /= W.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    if a is None:
        on = vals.detach() > 0
        fired = torch.zeros(pre.shape[-1], dtype=torch.bool, device=x.device)
        fired[idx[on]] = True
        l0 = float(on.float().sum(-1).mean())
    else:
        fired = (a > 0).any(0)
        l0 = float((a > 0).float().sum(-1).mean())
    return {"loss": float(loss.detach()), "fvu": float(fvu.detach()), "aux": float(aux.detach()), "l0": l0, "fired": fired, "kept_min": kept_min}


def _save_checkpoint(folder: Path, sae: SAE, opt: torch.optim.Optimizer, st: TrainState, cfg: TrainConfig) -> None:
    from safetensors.torch import save_file

    ck = folder / CKPT_DIR
    ck.mkdir(parents=True, exist_ok=True)
    t: dict[str, torch.Tensor] = {f"sae.{n}": p.detach().cpu().contiguous() for n, p in sae.named_parameters()}
    names = dict((id(p), n) for n, p in sae.named_parameters())
    adam_step = 0
    for p, s in opt.state.items():
        n = names[id(p)]
        t[f"adam.{n}.exp_avg"] = s["exp_avg"].cpu().contiguous()
        t[f"adam.{n}.exp_avg_sq"] = s["exp_avg_sq"].cpu().contiguous()
        adam_step = int(s["step"])
    assert st.last_fired is not None
    t["last_fired"] = st.last_fired.cpu().contiguous()
    with atomic_path(ck / CKPT_TENSORS, force=True) as tmp:
        save_file(t, str(tmp))
    meta = {
        "config": asdict(cfg),
        "sae_config": sae.cfg.to_json(),
        "step": st.step,
        "tokens": st.tokens,
        "refills": st.refills,
        "scale": st.scale,
        "adam_step": adam_step,
        "stream": asdict(st.stream),
        "chat_stream": asdict(st.chat) if st.chat is not None else None,
        "threshold": st.threshold,
        "chat_tokens": st.chat_tokens,
    }
    atomic_write_text(ck / CKPT_JSON, json.dumps(meta) + "\n", force=True)


def _load_checkpoint(folder: Path, sae: SAE, opt: torch.optim.Optimizer, cfg: TrainConfig) -> TrainState:
    from safetensors.torch import load_file

    ck = folder / CKPT_DIR
    if not (ck / CKPT_JSON).is_file() or not (ck / CKPT_TENSORS).is_file():
        raise SteerkitError(f"nothing to resume in {folder}: no {CKPT_DIR}/{CKPT_JSON}")
    meta = json.loads((ck / CKPT_JSON).read_text())
    old = dict(meta["config"])
    defaults = TrainConfig(layer=cfg.layer)
    for key in ("layer", "d_sae", "k", "architecture", "batch_size", "context", "buffer_tokens", "seed", "holdout", "model_batch", "passes",
                "chat_fraction", "drop_system", "mask_special", "diff", "init"):
        if old.get(key, getattr(defaults, key)) != getattr(cfg, key):
            raise SteerkitError(f"cannot resume: the checkpoint has {key}={old.get(key)!r}, this run {key}={getattr(cfg, key)!r}")
    t = load_file(str(ck / CKPT_TENSORS))
    dev = sae.W_dec.device
    with torch.no_grad():
        for n, p in sae.named_parameters():
            p.copy_(t[f"sae.{n}"])
    for n, p in sae.named_parameters():
        if f"adam.{n}.exp_avg" in t:
            opt.state[p] = {
                "step": torch.tensor(float(meta["adam_step"])),
                "exp_avg": t[f"adam.{n}.exp_avg"].to(dev),
                "exp_avg_sq": t[f"adam.{n}.exp_avg_sq"].to(dev),
            }

    return TrainState(
        step=meta["step"],
        tokens=meta["tokens"],
        refills=meta["refills"],
        scale=meta["scale"],
        stream=StreamState(**meta["stream"]),
        last_fired=t["last_fired"].to(dev),
        chat=ChatState(**meta["chat_stream"]) if meta.get("chat_stream") else None,
        threshold=float(meta.get("threshold", 0.0)),
        chat_tokens=int(meta.get("chat_tokens", 0)),
    )


def train_sae(
    model: LoadedModel,
    docs: Sequence[Document],
    cfg: TrainConfig,
    out: str | os.PathLike,
    resume: bool = False,
    force: bool = False,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    device: str | torch.device | None = None,
    stop_after_refills: int | None = None,
    extra_files: dict[str, str] | None = None,
    chats: Sequence[Any] | None = None,
    tuned: Any = None,
    init: SAE | None = None,
) -> SAE:
    """Train an SAE on ``docs`` (already split) at ``cfg.layer`` of ``model`` and save it to
    ``out`` (SAELens format, raw units, unit decoder rows). ``on_step`` gets live statistics.
    ``stop_after_refills`` ends the run early after a checkpoint (for tests of ``resume``).

    ``chats`` (lists of messages) make up ``cfg.chat_fraction`` of every batch's tokens, packed
    whole (:mod:`steerkit.sae_chat`); with ``cfg.diff`` the activations are ``tuned`` (a LoRA
    adapter folder, a model spec or a LoadedModel) minus ``model`` at the layer
    (:mod:`steerkit.sae_diff`); ``init`` (an SAE of this model and layer, in raw units) gives
    the starting weights."""
    folder = Path(out).expanduser()
    if not resume and (folder / "sae_weights.safetensors").exists() and not force:
        raise SteerkitError(f"{folder} already holds an SAE: pass --force to overwrite it or --resume to continue")
    if not resume and (folder / CKPT_DIR).exists() and not force:
        raise SteerkitError(f"{folder} holds a checkpoint of an unfinished run: pass --resume to continue it or --force to start over")
    if cfg.diff and tuned is None:
        raise SteerkitError("a diff-SAE needs the tuned model: pass --tuned ADAPTER_DIR")
    if chats and cfg.chat_fraction == 0 and not docs:
        raise SteerkitError("chats given with --chat-fraction 0 and no corpus: nothing to train on")
    dev = torch.device(device) if device is not None and str(device) != "auto" else model.device  # auto: the model's first device
    hook = model.hook_name(cfg.layer)
    if init is not None:
        check_init(init, model.name, cfg, model.d_model)
    torch.manual_seed(cfg.seed)
    arch = "topk" if cfg.architecture == "batchtopk" else cfg.architecture
    sae = new_sae(arch, model.d_model, cfg.d_sae, cfg.k if arch == "topk" else None, hook, model.name, seed=cfg.seed).to(dev)
    sae.requires_grad_(True)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    if resume:
        st = _load_checkpoint(folder, sae, opt, cfg)
    else:
        st = TrainState(last_fired=torch.zeros(cfg.d_sae, dtype=torch.long, device=dev))
    mixed = bool(chats) or cfg.diff or cfg.mask_special
    stream = ChunkStream(model, docs, cfg.context, cfg.seed, st.stream) if docs else None
    diff_info: dict[str, Any] | None = None
    if mixed:
        mix = plan_mix(cfg.chat_fraction if chats else 0.0, cfg.batch_size, cfg.buffer_tokens)
        chat_stream = None
        if chats and mix.chat:
            st.chat = st.chat or ChatState()
            chat_stream = ChatStream(model, chats, cfg.context, cfg.seed, cfg.drop_system, st.chat)
        if cfg.diff:
            acts_fn: Any = DiffActs(model, tuned, cfg.layer, dev)
            diff_info = acts_fn.info
        else:
            acts_fn = residual_acts(model, cfg.layer, dev)
        source = MixSource(model, mix, acts_fn, cfg.model_batch, chat_stream, stream if mix.text else None, cfg.mask_special)
    elif stream is None:
        raise SteerkitError("the corpus has no documents to train on")
    total_steps = math.ceil(cfg.tokens / cfg.batch_size)
    t0, tok0 = time.perf_counter(), st.tokens
    refills_here = 0
    while st.tokens < cfg.tokens:
        if mixed:
            buf = source.next_buffer()
        else:
            assert stream is not None
            buf = fill_buffer(model, stream, cfg.layer, cfg.buffer_tokens, cfg.model_batch, dev)  # (N, D)
        if buf.shape[0] == 0:
            raise SteerkitError("the corpus yielded no activations: documents too short for --context")
        if st.scale == 0.0:
            norm = float(buf.norm(dim=-1).mean())
            if norm == 0.0:
                raise SteerkitError(f"the tuned model's residuals equal the base model's at layer {cfg.layer}: "
                                    f"the fine-tune changes nothing at or below it; pick a later --layer")
            st.scale = math.sqrt(model.d_model) / norm
            with torch.no_grad():
                if init is not None:
                    _load_init(sae, init, st.scale)
                    if cfg.architecture == "batchtopk" and init.cfg.architecture == "jumprelu":
                        st.threshold = float(init.threshold.mean()) * st.scale
                else:
                    sae.b_dec.copy_((buf * st.scale).mean(0))
        g = torch.Generator().manual_seed(cfg.seed * 7919 + st.refills)
        if mixed:
            batches = mixed_batches(mix, cfg.passes, g)
        else:
            perm = torch.cat([torch.randperm(buf.shape[0], generator=g) for _ in range(cfg.passes)])
            batches = [perm[i : i + cfg.batch_size] for i in range(0, perm.shape[0] - cfg.batch_size + 1, cfg.batch_size)]
        st.refills += 1
        for idx in batches:
            if st.tokens >= cfg.tokens:
                break
            x = buf[idx.to(dev)] * st.scale
            dead = (st.tokens - st.last_fired) >= cfg.dead_tokens
            r = train_step(sae, opt, x, cfg, dead, _lr(cfg, st.step, total_steps))
            st.step += 1
            st.tokens += x.shape[0]
            if mixed:
                st.chat_tokens += int((idx < mix.n_chat).sum())
            st.last_fired[r.pop("fired")] = st.tokens
            kept_min = r.pop("kept_min")
            if kept_min is not None:  # batchtopk: the inference threshold, a running mean
                st.threshold = kept_min if st.threshold == 0.0 else 0.99 * st.threshold + 0.01 * kept_min
            if on_step is not None:
                el = time.perf_counter() - t0
                r.update(
                    step=st.step,
                    tokens=st.tokens,
                    total_tokens=cfg.tokens,
                    dead_fraction=float(((st.tokens - st.last_fired) >= min(cfg.dead_tokens, st.tokens)).float().mean()),
                    tokens_per_s=(st.tokens - tok0) / el if el > 0 else 0.0,
                )
                on_step(r)
        if stream is not None:
            st.stream = stream.state
        refills_here += 1
        if st.tokens < cfg.tokens and st.refills % cfg.checkpoint_every == 0:
            _save_checkpoint(folder, sae, opt, st, cfg)
            if stop_after_refills is not None and refills_here >= stop_after_refills:
                return sae
    meta: dict[str, Any] = {}
    if cfg.architecture == "batchtopk":
        meta["trained_as"] = "batchtopk"
        meta["k"] = cfg.k
    if diff_info is not None:
        meta["diff"] = diff_info
    if cfg.init:
        meta["init"] = cfg.init
    final = finish(sae, st.scale, st.threshold if cfg.architecture == "batchtopk" else None, meta or None)
    info: dict[str, Any] = {"config": asdict(cfg), "scale": st.scale, "steps": st.step, "tokens": st.tokens, "epochs": st.stream.epoch, "documents": len(docs)}
    if mixed:
        info["chat_tokens"] = st.chat_tokens
        info["chat_share"] = st.chat_tokens / max(st.tokens, 1)
        info["masked"] = "position 0 of every chunk" + (", special tokens and padding" if cfg.mask_special else "")
    if st.chat is not None:
        c = asdict(st.chat)
        info["chats"] = {"in_files": len(chats or ()), "rendered": c["conversations"], "epoch": c["epoch"], "with_system": c["with_system"],
                         "dropped_system": c["dropped_system"], "truncated_to_context": c["truncated"]}
    if diff_info is not None:
        info["diff"] = diff_info
    files = {TRAIN_FILE: json.dumps(info, indent=2) + "\n"}
    files.update(extra_files or {})
    save_sae(final, folder, force=True, extra_files=files)
    _remove_checkpoint(folder)
    return final


def check_init(init: SAE, model_name: str | None, cfg: TrainConfig, d_model: int | None, where: str = "--init") -> None:
    """Refuse an SAE to start from that does not fit: another model, layer, d_model or size, or
    an architecture that cannot continue as ``cfg.architecture``."""
    c = init.cfg
    if c.normalize_activations != "none" or not c.apply_b_dec_to_input:
        raise SteerkitError(f"{where} SAE normalises its input ({c.normalize_activations}) or skips b_dec on it: only SAEs of plain residuals can be continued")
    if model_name is not None and c.model_name and c.model_name != model_name:
        raise SteerkitError(f"{where} SAE was trained on model {c.model_name!r}, not {model_name!r}: give an SAE of {model_name} or --model {c.model_name}")
    if c.layer is not None and c.layer != cfg.layer:
        raise SteerkitError(f"{where} SAE reads layer {c.layer}, not --layer {cfg.layer}: drop --layer or give an SAE of layer {cfg.layer}")
    if d_model is not None and c.d_in != d_model:
        raise SteerkitError(f"{where} SAE reads d_in {c.d_in}, but {model_name} has d_model {d_model}")
    if c.d_sae != cfg.d_sae:
        raise SteerkitError(f"{where} SAE has {c.d_sae} latents, not --latents {cfg.d_sae}: drop --latents to keep its size")
    trained_as = (c.extra.get("steerkit") or {}).get("trained_as") if isinstance(c.extra.get("steerkit"), dict) else None
    arch = "batchtopk" if trained_as == "batchtopk" else c.architecture
    if arch != cfg.architecture:
        raise SteerkitError(f"{where} SAE is {arch}, this run {cfg.architecture}: drop --arch to continue it as {arch}")
    is_diff = isinstance(c.extra.get("steerkit"), dict) and "diff" in c.extra["steerkit"]
    if is_diff != cfg.diff:
        raise SteerkitError(f"{where} SAE is {'a diff-SAE' if is_diff else 'an SAE of residuals'}: "
                            f"{'add --diff --tuned ADAPTER' if is_diff else 'drop --diff'} to continue it")


@torch.no_grad()
def _load_init(sae: SAE, init: SAE, scale: float) -> None:
    """Copy ``init`` (raw units) into the training SAE, which reads inputs x scale."""
    for name in ("W_enc", "W_dec"):
        getattr(sae, name).copy_(getattr(init, name).to(sae.W_dec.device))
    sae.b_enc.copy_(init.b_enc.to(sae.W_dec.device) * scale)
    sae.b_dec.copy_(init.b_dec.to(sae.W_dec.device) * scale)
    n = sae.W_dec.norm(dim=-1).clamp(min=1e-12)  # unit rows, as training keeps them
    sae.W_dec.div_(n[:, None])
    sae.W_enc.mul_(n[None, :])
    sae.b_enc.mul_(n)


def train_on_activations(x: torch.Tensor, cfg: TrainConfig, hook_name: str | None = None, model_name: str | None = None) -> SAE:
    """Train on a fixed activation tensor ``x [N, d_in]`` (tests, benchmarks, activations
    gathered elsewhere): the same steps as :func:`train_sae`, ``cfg.tokens`` tokens in all."""
    d_in = x.shape[1]
    arch = "topk" if cfg.architecture == "batchtopk" else cfg.architecture
    sae = new_sae(arch, d_in, cfg.d_sae, cfg.k if arch == "topk" else None, hook_name, model_name, seed=cfg.seed).to(x.device)
    sae.requires_grad_(True)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    scale = math.sqrt(d_in) / float(x.norm(dim=-1).mean())
    with torch.no_grad():
        sae.b_dec.copy_((x * scale).mean(0))
    last = torch.zeros(cfg.d_sae, dtype=torch.long, device=x.device)
    total = math.ceil(cfg.tokens / cfg.batch_size)
    g = torch.Generator().manual_seed(cfg.seed)
    seen, threshold = 0, 0.0
    for step in range(total):
        idx = torch.randint(0, x.shape[0], (cfg.batch_size,), generator=g).to(x.device)
        dead = (seen - last) >= cfg.dead_tokens
        r = train_step(sae, opt, x[idx] * scale, cfg, dead, _lr(cfg, step, total))
        seen += cfg.batch_size
        last[r["fired"]] = seen
        if r["kept_min"] is not None:
            threshold = r["kept_min"] if threshold == 0.0 else 0.99 * threshold + 0.01 * r["kept_min"]
    return finish(sae, scale, threshold if cfg.architecture == "batchtopk" else None)


def finish(sae: SAE, scale: float, threshold: float | None = None, meta: dict[str, Any] | None = None) -> SAE:
    """The trained SAE (on inputs * scale) as one that reads raw activations. With ``threshold``
    (BatchTopK, in scaled units) it becomes a JumpReLU SAE with that threshold on every latent;
    ``meta`` goes into its cfg.json under ``steerkit``."""
    arch = "jumprelu" if threshold is not None else sae.cfg.architecture
    out = new_sae(arch, sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k if arch == "topk" else None, sae.cfg.hook_name, sae.cfg.model_name)
    if meta:
        out.cfg = replace(out.cfg, extra={"steerkit": meta})
    state = {k: v.detach().cpu() for k, v in sae.state_dict().items()}
    if threshold is not None:
        state["threshold"] = torch.full((sae.cfg.d_sae,), float(threshold))
    out.load_state_dict(state)
    out.fold_decoder_norm()
    out.fold_input_scale(scale)
    out.requires_grad_(False)
    return out


def _remove_checkpoint(folder: Path) -> None:
    ck = folder / CKPT_DIR
    for name in (CKPT_TENSORS, CKPT_JSON):
        if (ck / name).exists():
            (ck / name).unlink()
    if ck.is_dir() and not any(ck.iterdir()):
        ck.rmdir()


def training_documents(paths: Sequence[str | os.PathLike], holdout: int = 50, part: str = "train") -> list[Document]:
    return split_documents(read_documents(paths), part, holdout)


__all__ = ["TrainConfig", "train_sae", "check_init", "train_on_activations", "split_documents", "ChunkStream", "chunk_activations", "doc_tokens", "training_documents", "finish", "replace"]
