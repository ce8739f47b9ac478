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
Only ``topk`` and ``relu`` (L1 penalty) SAEs are trained here; JumpReLU ones only load.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from steerkit.activations import residuals
from steerkit.corpus import Document
from steerkit.errors import SteerkitError
from steerkit.sae import SAE, new_sae, save_sae

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

    def __post_init__(self) -> None:
        if self.architecture not in ("topk", "relu"):
            raise SteerkitError(f"training supports architectures topk and relu, not {self.architecture!r}")
        for name in ("d_sae", "tokens", "batch_size", "context", "model_batch", "buffer_tokens", "passes"):
            if getattr(self, name) <= 0:
                raise SteerkitError(f"{name} must be positive, got {getattr(self, name)}")
        if self.context < 2:
            raise SteerkitError("context must be at least 2 tokens (position 0 is dropped)")
        if self.architecture == "topk" and not 0 < self.k <= self.d_sae:
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


_EOS: dict[int, list[int]] = {}


def doc_tokens(model: Any, d: Document) -> list[int]:
    """Token ids of one document: plain text + EOS, or a chat rendered with the chat template."""
    tok = model.tokenizer
    if isinstance(d, str):
        ids = list(tok(d, add_special_tokens=False)["input_ids"])
        if id(tok) not in _EOS:  # eos_token_ids() is slow (~0.1 s): once per tokenizer
            _EOS[id(tok)] = list(model.eos_token_ids())[:1]
        return ids + _EOS[id(tok)]
    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template(d, add_generation_prompt=False, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)
    return list(tok("".join(f"{m['role']}: {m['content']}\n" for m in d))["input_ids"])


def docs_tokens(model: Any, docs: Sequence[Document]) -> list[list[int]]:
    """:func:`doc_tokens` for many documents at once (same ids, one batched tokenizer call)."""
    tok = model.tokenizer
    if not getattr(tok, "chat_template", None) and any(not isinstance(d, str) for d in docs):
        return [doc_tokens(model, d) for d in docs]
    texts = [d if isinstance(d, str) else tok.apply_chat_template(d, add_generation_prompt=False, tokenize=False) for d in docs]
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    if id(tok) not in _EOS:
        _EOS[id(tok)] = list(model.eos_token_ids())[:1]
    return [list(ids) + (_EOS[id(tok)] if isinstance(d, str) else []) for d, ids in zip(docs, enc)]


@dataclass
class StreamState:
    """Where a token stream stands: epoch, next document, tokens carried into the next chunk."""

    epoch: int = 0
    doc: int = 0
    carry: list[int] = field(default_factory=list)


class ChunkStream:
    """Endless fixed-length token chunks from shuffled documents (reshuffled every epoch)."""

    def __init__(self, model: Any, docs: Sequence[Document], context: int, seed: int, state: StreamState | None = None, cycle: bool = True) -> None:
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


def chunk_activations(model: Any, chunks: torch.Tensor, layer: int) -> torch.Tensor:
    """Activations of packed chunks ``[B, T]`` at ``layer``, position 0 dropped: ``[B*(T-1), D]``."""
    x = residuals(model, chunks, layer)  # (B, T, D)
    return x[:, 1:].reshape(-1, x.shape[-1])


def fill_buffer(model: Any, stream: ChunkStream, layer: int, n_tokens: int, model_batch: int, device: torch.device) -> torch.Tensor:
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
    topk = cfg.architecture == "topk"
    if topk and sparse:
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
    return {"loss": float(loss.detach()), "fvu": float(fvu.detach()), "aux": float(aux.detach()), "l0": l0, "fired": fired}


def _save_checkpoint(folder: Path, sae: SAE, opt: torch.optim.Optimizer, st: TrainState, cfg: TrainConfig) -> None:
    from safetensors.torch import save_file

    from steerkit.fsutil import atomic_path, atomic_write_text

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
    }
    atomic_write_text(ck / CKPT_JSON, json.dumps(meta) + "\n", force=True)


def _load_checkpoint(folder: Path, sae: SAE, opt: torch.optim.Optimizer, cfg: TrainConfig) -> TrainState:
    from safetensors.torch import load_file

    ck = folder / CKPT_DIR
    if not (ck / CKPT_JSON).is_file() or not (ck / CKPT_TENSORS).is_file():
        raise SteerkitError(f"nothing to resume in {folder}: no {CKPT_DIR}/{CKPT_JSON}")
    meta = json.loads((ck / CKPT_JSON).read_text())
    old = dict(meta["config"])
    for key in ("layer", "d_sae", "k", "architecture", "batch_size", "context", "buffer_tokens", "seed", "holdout", "model_batch", "passes"):
        if old.get(key) != getattr(cfg, key):
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
    )


def train_sae(
    model: Any,
    docs: Sequence[Document],
    cfg: TrainConfig,
    out: str | os.PathLike,
    resume: bool = False,
    force: bool = False,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    device: str | torch.device | None = None,
    stop_after_refills: int | None = None,
    extra_files: dict[str, str] | None = None,
) -> SAE:
    """Train an SAE on ``docs`` (already split) at ``cfg.layer`` of ``model`` and save it to
    ``out`` (SAELens format, raw units, unit decoder rows). ``on_step`` gets live statistics.
    ``stop_after_refills`` ends the run early after a checkpoint (for tests of ``resume``)."""
    folder = Path(out).expanduser()
    if not resume and (folder / "sae_weights.safetensors").exists() and not force:
        raise SteerkitError(f"{folder} already holds an SAE: pass --force to overwrite it or --resume to continue")
    if not resume and (folder / CKPT_DIR).exists() and not force:
        raise SteerkitError(f"{folder} holds a checkpoint of an unfinished run: pass --resume to continue it or --force to start over")
    dev = torch.device(device) if device is not None else model.device
    hook = model.hook_name(cfg.layer)
    torch.manual_seed(cfg.seed)
    sae = new_sae(cfg.architecture, model.d_model, cfg.d_sae, cfg.k if cfg.architecture == "topk" else None, hook, model.name, seed=cfg.seed).to(dev)
    sae.requires_grad_(True)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    if resume:
        st = _load_checkpoint(folder, sae, opt, cfg)
    else:
        st = TrainState(last_fired=torch.zeros(cfg.d_sae, dtype=torch.long, device=dev))
    stream = ChunkStream(model, docs, cfg.context, cfg.seed, st.stream)
    total_steps = math.ceil(cfg.tokens / cfg.batch_size)
    t0, tok0 = time.perf_counter(), st.tokens
    refills_here = 0
    while st.tokens < cfg.tokens:
        buf = fill_buffer(model, stream, cfg.layer, cfg.buffer_tokens, cfg.model_batch, dev)  # (N, D)
        if buf.shape[0] == 0:
            raise SteerkitError("the corpus yielded no activations: documents too short for --context")
        if st.scale == 0.0:
            st.scale = math.sqrt(model.d_model) / float(buf.norm(dim=-1).mean())
            with torch.no_grad():
                sae.b_dec.copy_((buf * st.scale).mean(0))
        g = torch.Generator().manual_seed(cfg.seed * 7919 + st.refills)
        perm = torch.cat([torch.randperm(buf.shape[0], generator=g) for _ in range(cfg.passes)]).to(dev)
        st.refills += 1
        for i in range(0, perm.shape[0] - cfg.batch_size + 1, cfg.batch_size):
            if st.tokens >= cfg.tokens:
                break
            x = buf[perm[i : i + cfg.batch_size]] * st.scale
            dead = (st.tokens - st.last_fired) >= cfg.dead_tokens
            r = train_step(sae, opt, x, cfg, dead, _lr(cfg, st.step, total_steps))
            st.step += 1
            st.tokens += x.shape[0]
            st.last_fired[r.pop("fired")] = st.tokens
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
        st.stream = stream.state
        refills_here += 1
        if st.tokens < cfg.tokens and st.refills % cfg.checkpoint_every == 0:
            _save_checkpoint(folder, sae, opt, st, cfg)
            if stop_after_refills is not None and refills_here >= stop_after_refills:
                return sae
    final = finish(sae, st.scale)
    info = {"config": asdict(cfg), "scale": st.scale, "steps": st.step, "tokens": st.tokens, "epochs": st.stream.epoch, "documents": len(docs)}
    files = {TRAIN_FILE: json.dumps(info, indent=2) + "\n"}
    files.update(extra_files or {})
    save_sae(final, folder, force=True, extra_files=files)
    _remove_checkpoint(folder)
    return final


def train_on_activations(x: torch.Tensor, cfg: TrainConfig, hook_name: str | None = None, model_name: str | None = None) -> SAE:
    """Train on a fixed activation tensor ``x [N, d_in]`` (tests, benchmarks, activations
    gathered elsewhere): the same steps as :func:`train_sae`, ``cfg.tokens`` tokens in all."""
    d_in = x.shape[1]
    sae = new_sae(cfg.architecture, d_in, cfg.d_sae, cfg.k if cfg.architecture == "topk" else None, hook_name, model_name, seed=cfg.seed).to(x.device)
    sae.requires_grad_(True)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    scale = math.sqrt(d_in) / float(x.norm(dim=-1).mean())
    with torch.no_grad():
        sae.b_dec.copy_((x * scale).mean(0))
    last = torch.zeros(cfg.d_sae, dtype=torch.long, device=x.device)
    total = math.ceil(cfg.tokens / cfg.batch_size)
    g = torch.Generator().manual_seed(cfg.seed)
    seen = 0
    for step in range(total):
        idx = torch.randint(0, x.shape[0], (cfg.batch_size,), generator=g).to(x.device)
        dead = (seen - last) >= cfg.dead_tokens
        r = train_step(sae, opt, x[idx] * scale, cfg, dead, _lr(cfg, step, total))
        seen += cfg.batch_size
        last[r["fired"]] = seen
    return finish(sae, scale)


def finish(sae: SAE, scale: float) -> SAE:
    """The trained SAE (on inputs * scale) as one that reads raw activations."""
    out = new_sae(sae.cfg.architecture, sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k, sae.cfg.hook_name, sae.cfg.model_name)
    out.load_state_dict({k: v.detach().cpu() for k, v in sae.state_dict().items()})
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
    from steerkit.corpus import read_documents

    return split_documents(read_documents(paths), part, holdout)


__all__ = ["TrainConfig", "train_sae", "train_on_activations", "split_documents", "ChunkStream", "chunk_activations", "doc_tokens", "training_documents", "finish", "replace"]
