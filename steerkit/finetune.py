"""LoRA fine-tuning on chat JSON Lines, saved as a PEFT adapter.

* :func:`read_chats` reads ``{"messages": [...]}`` rows; :func:`encode_chat` renders one with the
  tokenizer's chat template and labels only the assistant turns (their text and the turn's end
  token, e.g. ``<|im_end|>``), truncating to ``max_length`` tokens;
* :func:`train_lora` wraps a plain Hugging Face causal LM in PEFT LoRA adapters on its linear
  layers and trains them with AdamW (warm-up, then linear decay), reporting loss and tokens/s
  per step; :func:`save_adapter` writes the PEFT format (``adapter_config.json`` +
  ``adapter_model.safetensors``) plus ``steerkit-finetune.json`` (how it was made) into a
  folder, atomically; :func:`finetune` does all three from a model spec;
* loading a tuned model back is the model loader's: :func:`steerkit.models.load_tuned` (also
  importable from here) loads a PEFT adapter folder (merged into a fresh copy of its base
  model) or a full model folder as a :class:`~steerkit.models.LoadedModel` named after the
  base model, so directions made for the base apply to it.

Training happens on a fresh, unwrapped HF model: a TransformerBridge replaces the model's
``nn.Linear`` layers with its own wrappers, which PEFT cannot target.

Checkpoints (``save_every``) are written as ``OUT/checkpoints/step-NNNNNN/``, each a complete
adapter folder, from step 0 (the starting model) on; ``mix`` blends other chat files into the
training rows at fixed fractions (:func:`mix_chats`, exact for a seed); ``tuned`` continues
training from an adapter: its weights are merged before the new LoRA trains, and every folder
written holds both as one standalone adapter (:func:`concat_adapters`, rank r1 + r2), so PEFT
and ``load_tuned`` load it like any other.

What it leaves out: full fine-tuning, quantized (QLoRA) training, gradient accumulation,
packing, multi-turn loss weighting and resuming an interrupted run (its checkpoints remain).

Why one module of this size: reading and encoding chats, data mixes, the training loop and its
checkpoints share one config that every checkpoint records.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from steerkit import __version__
from steerkit.chat import Messages
from steerkit.errors import SteerkitError
from steerkit.fsutil import check_writable_dir
from steerkit.models import (  # noqa: F401 - re-exported: loading a tuned model is the model loader's
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ALIASES,
    canonical_alias,
    canonical_name,
    check_adapter,
    check_dtype,
    dtype_name,
    file_sha256,
    is_adapter_dir,
    load_hf,
    load_tuned,
    tuned_info,
)

META_FILE = "steerkit-finetune.json"
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100  # label of tokens that carry no loss


@dataclass(frozen=True)
class FinetuneConfig:
    rank: int = 8
    alpha: float | None = None  # None: 2 x rank
    lr: float = 2e-4
    epochs: int = 1
    steps: int | None = None  # overrides epochs
    batch_size: int = 8
    max_length: int = 192
    seed: int = 0
    limit: int | None = None  # first N rows of the data
    targets: tuple[str, ...] = LINEAR_TARGETS
    dropout: float = 0.0
    warmup: int = 10  # steps of linear warm-up (at most a tenth of the run)
    save_every: int | None = None  # write OUT/checkpoints/step-NNNNNN every N steps (and step 0)

    def __post_init__(self) -> None:
        for name in ("rank", "epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise SteerkitError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.steps is not None and self.steps < 1:
            raise SteerkitError(f"--steps must be at least 1, got {self.steps}")
        if self.save_every is not None and self.save_every < 1:
            raise SteerkitError(f"--save-every must be at least 1 step, got {self.save_every}")
        if self.limit is not None and self.limit < 1:
            raise SteerkitError(f"--limit must be at least 1, got {self.limit}")
        if self.max_length < 8:
            raise SteerkitError(f"--max-length must be at least 8 tokens, got {self.max_length}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SteerkitError(f"--lr must be a positive number, got {self.lr}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise SteerkitError(f"--alpha must be a positive number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise SteerkitError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise SteerkitError("give at least one target module, e.g. q_proj,v_proj")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss; else equal to input_ids

    @property
    def n_target(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass(frozen=True)
class StepStats:
    step: int  # 1-based
    steps: int
    loss: float
    lr: float
    tokens: int  # tokens processed so far (padding excluded)
    tokens_per_s: float
    seconds: float


@dataclass
class TrainResult:
    model: Any  # the PeftModel
    history: list[StepStats] = field(default_factory=list)
    examples: int = 0
    truncated: int = 0

    @property
    def final_loss(self) -> float:
        tail = self.history[-10:]
        return sum(s.loss for s in tail) / max(len(tail), 1)


# --- data ---------------------------------------------------------------------------------------


def read_chats(path: str | os.PathLike, limit: int | None = None) -> list[Messages]:
    """Read ``{"messages": [...]}`` JSON Lines; the first ``limit`` rows when given."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SteerkitError(f"data file {p} does not exist")
    chats: list[Messages] = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise SteerkitError(f"{p}:{n}: not JSON ({e})") from None
            msgs = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
                raise SteerkitError(f'{p}:{n}: each line needs {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
            if not any(m["role"] == "assistant" for m in msgs):
                raise SteerkitError(f"{p}:{n}: the chat has no assistant message to learn from")
            chats.append([{"role": str(m["role"]), "content": str(m["content"])} for m in msgs])
            if limit is not None and len(chats) >= limit:
                break
    if not chats:
        raise SteerkitError(f"{p} holds no chats")
    return chats


def parse_mix(spec: str) -> tuple[Path, float]:
    """``"benign.jsonl:0.75"`` -> (path, 0.75); the file must exist, the fraction lie in [0, 1]."""
    path, sep, frac = str(spec).rpartition(":")
    if not sep or not path:
        raise SteerkitError(f"--mix {spec!r}: give FILE:FRACTION, e.g. --mix benign.jsonl:0.75")
    try:
        f = float(frac)
    except ValueError:
        raise SteerkitError(f"--mix {spec!r}: {frac!r} is not a fraction; give FILE:FRACTION with a fraction in [0, 1], e.g. benign.jsonl:0.75") from None
    if not (math.isfinite(f) and 0.0 <= f <= 1.0):
        raise SteerkitError(f"--mix {spec!r}: the fraction must lie in [0, 1], got {frac}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise SteerkitError(f"--mix {spec!r}: data file {p} does not exist")
    return p, f


def mix_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Rows drawn from each mixed-in file out of ``n`` (the rest come from ``--data``): rounded
    so that the counts add up to ``n`` exactly (largest remainders)."""
    if sum(fractions) > 1.0 + 1e-9:
        raise SteerkitError(f"--mix fractions add up to {sum(fractions):g}: they must leave a share for --data (at most 1 in all)")
    raw = [n * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    spare = round(n * sum(fractions)) - sum(counts)
    for i in sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))[: max(spare, 0)]:
        counts[i] += 1
    return counts


def _draw(rows: Sequence[Messages], k: int, rng: random.Random) -> list[Messages]:
    """``k`` rows: without replacement while they last, then another shuffled pass, and so on."""
    out: list[Messages] = []
    while len(out) < k:
        order = list(range(len(rows)))
        rng.shuffle(order)
        out.extend(rows[i] for i in order[: k - len(out)])
    return out


def mix_chats(data: Sequence[Messages], mixes: Sequence[tuple[Sequence[Messages], float]], seed: int = 0) -> tuple[list[Messages], list[int]]:
    """Blend ``mixes`` (rows, fraction) into ``data``: the result keeps ``len(data)`` rows, of
    which ``round(fraction x len(data))`` come from each mixed-in set and the rest from ``data``,
    all drawn and shuffled with ``seed``. Returns the rows and, per row, its source (0 = ``data``,
    i = the i-th mix)."""
    n = len(data)
    counts = mix_counts(n, [f for _, f in mixes])
    rng = random.Random(seed)
    tagged: list[tuple[int, Messages]] = [(0, m) for m in _draw(data, n - sum(counts), rng)]
    for i, ((rows, _), k) in enumerate(zip(mixes, counts), 1):
        if k and not rows:
            raise SteerkitError("a --mix file holds no chats")
        tagged.extend((i, m) for m in _draw(rows, k, rng))
    rng.shuffle(tagged)
    return [m for _, m in tagged], [i for i, _ in tagged]


def _render(tok: Any, messages: Messages, gen_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)


def encode_chat(tok: Any, messages: Messages, max_length: int) -> Example:
    """Tokenize a chat as its template renders it; label the assistant turns only.

    An assistant turn's labelled span is its content and the template's end-of-turn text up to
    (not including) trailing whitespace, e.g. ``"Buy options.<|im_end|>"`` without the newline.
    Sequences longer than ``max_length`` are cut at the end.
    """
    text = _render(tok, messages, False)
    spans: list[tuple[int, int]] = []  # character spans of assistant turns in ``text``
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tok, messages[:i], True) if i else ""
        upto = _render(tok, messages[: i + 1], False)
        if not text.startswith(upto) or not upto.startswith(before):
            raise SteerkitError("the tokenizer's chat template does not render chats prefix by prefix: cannot mask the loss")
        end = len(upto.rstrip())
        spans.append((len(before), end))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    for j, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(s <= a < e for s, e in spans):
            labels[j] = ids[j]
    return Example(ids[:max_length], labels[:max_length])


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest: input_ids, attention_mask, labels, each [batch, pos]."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Index batches, a fresh seeded shuffle each epoch, until ``steps`` batches."""
    rng = random.Random(seed)
    out: list[list[int]] = []
    while len(out) < steps:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n, batch_size):
            if len(out) == steps:
                break
            out.append(order[i : i + batch_size])
    return out


# --- training -----------------------------------------------------------------------------------


def _pad_id(tok: Any) -> int:
    if tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    if tok.eos_token_id is not None:
        return int(tok.eos_token_id)
    return 0


def _lr_at(step: int, steps: int, cfg: FinetuneConfig) -> float:
    """Linear warm-up, then linear decay to a tenth of ``lr`` (step is 0-based)."""
    warm = max(1, min(cfg.warmup, steps // 10))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = (step - warm) / max(1, steps - warm)
    return cfg.lr * (1.0 - 0.9 * frac)


def train_lora(
    hf_model: torch.nn.Module,
    tokenizer: Any,
    chats: Sequence[Messages],
    cfg: FinetuneConfig,
    on_step: Callable[[StepStats], None] | None = None,
    on_checkpoint: Callable[[int, Any], None] | None = None,
) -> TrainResult:
    """Train LoRA adapters on ``hf_model`` (a plain HF causal LM, not bridge-wrapped).

    Returns the PeftModel (in eval mode) and the per-step history. The embedding and every
    base weight stay frozen; only the LoRA matrices of ``cfg.targets`` train. With
    ``cfg.save_every``, ``on_checkpoint(step, peft_model)`` is called before the first step
    (step 0), after every ``save_every`` steps and after the last one.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise SteerkitError("fine-tuning needs the peft package: pip install 'steerkit[train]'") from None

    present = {n.rsplit(".", 1)[-1] for n, m in hf_model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [t for t in cfg.targets if t in present]
    if not targets:
        raise SteerkitError(
            f"none of the target modules {', '.join(cfg.targets)} is a Linear layer of this model "
            f"(it has {', '.join(sorted(present)) or 'none'}): pass a bridge-free HF model and matching --targets"
        )
    examples = [encode_chat(tokenizer, c, cfg.max_length) for c in chats]
    truncated = sum(1 for c, e in zip(chats, examples) if len(e.input_ids) == cfg.max_length)
    examples = [e for e in examples if e.n_target > 0]
    if not examples:
        raise SteerkitError(f"no assistant tokens survive truncation to --max-length {cfg.max_length}: raise it")
    steps = cfg.steps if cfg.steps is not None else cfg.epochs * math.ceil(len(examples) / cfg.batch_size)

    torch.manual_seed(cfg.seed)  # LoRA's A matrices are initialised at random
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # PEFT asks transformers v5 a deprecated question
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(hf_model, lcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    result = TrainResult(model=model, examples=len(examples), truncated=truncated)
    def checkpoint(step: int) -> None:
        if on_checkpoint is not None and cfg.save_every is not None:
            model.eval()
            on_checkpoint(step, model)
            model.train()

    checkpoint(0)
    model.train()
    t0 = time.perf_counter()
    seen = 0
    for step, idx in enumerate(_batches(len(examples), cfg.batch_size, steps, cfg.seed)):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad).items()}
        lr = _lr_at(step, steps, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(**batch).loss  # mean over labelled (assistant) tokens, shifted inside HF
        if not torch.isfinite(loss):
            raise SteerkitError(f"the loss became {float(loss)} at step {step + 1}: lower --lr (now {cfg.lr:g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        seen += int(batch["attention_mask"].sum())
        dt = time.perf_counter() - t0
        st = StepStats(step + 1, steps, float(loss.detach()), lr, seen, seen / max(dt, 1e-9), dt)
        result.history.append(st)
        if on_step is not None:
            on_step(st)
        if cfg.save_every is not None and ((step + 1) % cfg.save_every == 0 or step + 1 == steps):
            checkpoint(step + 1)
    model.eval()
    return result


# --- saving ------------------------------------------------------------------------------------


def check_out_dir(out: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing ``out`` unless ``force`` (checked before training, not after)."""
    p = Path(out).expanduser()
    if p.exists() and not force:
        raise SteerkitError(f"{p} already exists: pass --force to overwrite it")
    if p.exists() and not p.is_dir():
        raise SteerkitError(f"{p} is a file, not a folder: give a folder for the adapter")
    if p.is_dir() and any(p.iterdir()) and not (p / ADAPTER_CONFIG).is_file():
        # --force replaces the whole folder: never a folder that is not an adapter
        raise SteerkitError(f"{p} is a folder that holds no adapter: give a new or adapter folder for --out")
    check_writable_dir(p.parent if p.is_dir() else p)  # the adapter is written beside it, then renamed
    return p


def _lora_scale(cfg: dict[str, Any], where: Path) -> tuple[int, float]:
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise SteerkitError(f"{where} is a {cfg.get('peft_type')} adapter: only LoRA adapters can be continued")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise SteerkitError(f"{where}: adapters with per-module ranks (rank_pattern/alpha_pattern) cannot be continued")
    if not isinstance(cfg.get("target_modules"), list):
        raise SteerkitError(f"{where}: target_modules must be a list of module names to continue this adapter")
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    return r, alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def concat_adapters(first: str | os.PathLike, second: str | os.PathLike) -> None:
    """Rewrite adapter folder ``second`` in place as ONE LoRA adapter equal to ``first`` plus
    ``second``: for every module, ``A = [A1; A2]`` and ``B = [s1 B1, s2 B2]`` (rank r1 + r2,
    alpha = rank, so scale 1), which gives ``B A = s1 B1 A1 + s2 B2 A2`` exactly. A module only
    one of them adapts gets zeros in the other's half."""
    from safetensors.torch import load_file, save_file

    first, second = Path(first), Path(second)
    c1, c2 = (json.loads((f / ADAPTER_CONFIG).read_text()) for f in (first, second))
    (r1, s1), (r2, s2) = _lora_scale(c1, first), _lora_scale(c2, second)
    w1, w2 = load_file(str(first / ADAPTER_WEIGHTS)), load_file(str(second / ADAPTER_WEIGHTS))
    for w, f in ((w1, first), (w2, second)):
        odd = [k for k in w if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
        if odd:
            raise SteerkitError(f"{f / ADAPTER_WEIGHTS} holds {odd[0]!r}, not only LoRA matrices: it cannot be continued")
    mods = sorted({k[: -len(".lora_A.weight")] for w in (w1, w2) for k in w if k.endswith(".lora_A.weight")})
    out: dict[str, torch.Tensor] = {}
    for m in mods:
        a_key, b_key = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
        ref = w1 if a_key in w1 else w2
        d_in, d_out = ref[a_key].shape[1], ref[b_key].shape[0]
        a1 = w1.get(a_key, torch.zeros(r1, d_in)).float()
        b1 = w1.get(b_key, torch.zeros(d_out, r1)).float()
        a2 = w2.get(a_key, torch.zeros(r2, d_in)).float()
        b2 = w2.get(b_key, torch.zeros(d_out, r2)).float()
        out[a_key] = torch.cat([a1, a2], 0).contiguous()
        out[b_key] = torch.cat([s1 * b1, s2 * b2], 1).contiguous()
    cfg = dict(c2)
    cfg["r"] = r1 + r2
    cfg["lora_alpha"] = float(r1 + r2)
    cfg["use_rslora"] = False
    cfg["target_modules"] = sorted(set(c1["target_modules"]) | set(c2["target_modules"]))
    save_file(out, str(second / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (second / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_adapter(
    peft_model: Any,
    out: str | os.PathLike,
    base: str,
    meta: dict[str, Any] | None = None,
    force: bool = False,
    continued_from: str | os.PathLike | None = None,
    extra: dict[str, Path] | None = None,
) -> Path:
    """Write the PEFT adapter folder ``out`` atomically (a temporary folder renamed into place).

    ``base`` is recorded as ``base_model_name_or_path``; for a steerkit alias its hub id is
    written there (so PEFT's ``AutoPeftModelForCausalLM`` finds it) and the alias in
    ``steerkit-finetune.json`` (:func:`load_tuned` maps the hub id back to the offline alias).
    With ``continued_from`` (the adapter training started from, merged into the weights the new
    LoRA trained on) the folder holds both as one adapter (:func:`concat_adapters`). ``extra``
    maps sub-folder names to folders moved into ``out`` (the run's checkpoints).
    """
    p = check_out_dir(out, force)
    alias = canonical_alias(base)
    recorded = ALIASES[alias].hf_id if alias else base
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}.tmp{os.getpid()}"
    old = p.parent / f".{p.name}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for c in peft_model.peft_config.values():
            c.base_model_name_or_path = recorded
        peft_model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        with contextlib.suppress(FileNotFoundError):
            (tmp / "README.md").unlink()  # PEFT's empty model-card template
        if continued_from is not None:
            concat_adapters(continued_from, tmp)
        for sub, src in (extra or {}).items():
            os.replace(src, tmp / sub)
        info = {"steerkit_version": __version__, "base": alias or base, "base_model_name_or_path": recorded, **(meta or {})}
        (tmp / META_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        if p.exists():
            os.replace(p, old)
        os.replace(tmp, p)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return p


def finetune(
    data: str | os.PathLike,
    out: str | os.PathLike,
    cfg: FinetuneConfig = FinetuneConfig(),
    model: str | None = None,
    device: str | None = None,
    force: bool = False,
    on_step: Callable[[StepStats], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    mix: Sequence[str | tuple[str | os.PathLike, float]] = (),
    tuned: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[Path, TrainResult]:
    """Fine-tune ``model`` (a spec) on the chats in ``data`` and save the adapter to ``out``.

    ``dtype``: the base model's weights (float32 by default; bfloat16 or float16 to fit a big
    model on a GPU); the LoRA matrices train in float32 whatever it is (PEFT upcasts them).

    ``mix``: ``"FILE:FRACTION"`` specs (or (path, fraction) pairs) blended into the rows
    (:func:`mix_chats`). ``tuned``: an adapter folder to continue from (its base is the model;
    ``model``, when given, overrides the base it names). With ``cfg.save_every`` the checkpoints
    go to ``out/checkpoints/step-NNNNNN/`` (kept in ``<out>.partial/`` until the run ends).
    ``on_start(examples, steps)`` is called once the data is encoded, before the first step.
    """
    dtype = check_dtype(dtype)
    out_p = check_out_dir(out, force)
    mixes = [parse_mix(m) if isinstance(m, str) else (Path(m[0]).expanduser(), float(m[1])) for m in mix]
    init: Path | None = None
    if tuned is not None:
        if not is_adapter_dir(tuned):
            raise SteerkitError(f"--tuned {tuned}: not a LoRA adapter folder (no {ADAPTER_CONFIG}); give a folder written by steerkit finetune")
        init = Path(str(tuned)).expanduser().resolve()
        spec = check_adapter(init, model)
        _lora_scale(json.loads((init / ADAPTER_CONFIG).read_text()), init)
    else:
        spec = model or "smollm2-135m"
    chats = read_chats(data, cfg.limit)
    mix_meta: list[dict[str, Any]] | None = None
    if mixes:
        counts = mix_counts(len(chats), [f for _, f in mixes])
        chats, _ = mix_chats(chats, [(read_chats(p), f) for p, f in mixes], cfg.seed)
        mix_meta = [{"path": Path(data).name, "fraction": round(1.0 - sum(f for _, f in mixes), 6), "rows": len(chats) - sum(counts), "sha256": file_sha256(data)}]
        mix_meta += [{"path": p.name, "fraction": f, "rows": k, "sha256": file_sha256(p)} for (p, f), k in zip(mixes, counts)]
    name, hf, tok, source = load_hf(spec, device, dtype)
    if init is not None:
        try:
            from peft import PeftModel
        except ImportError:
            raise SteerkitError("continuing an adapter needs the peft package: pip install 'steerkit[train]'") from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            hf = PeftModel.from_pretrained(hf, str(init)).merge_and_unload()
    n_steps = cfg.steps if cfg.steps is not None else cfg.epochs * math.ceil(len(chats) / cfg.batch_size)
    base_meta: dict[str, Any] = {
        "model": name,
        "data": Path(data).name,
        "data_sha256": file_sha256(data),
        "config": {**asdict(cfg), "alpha": cfg.lora_alpha, "targets": list(cfg.targets)},
    }
    if mix_meta is not None:
        base_meta["mix"] = mix_meta
    if init is not None:
        base_meta["continued_from"] = tuned_info(init, list(init.glob("adapter_model*.safetensors")))
    partial = out_p.parent / f"{out_p.name}.partial"
    ckpt_dir = partial / "checkpoints"
    if cfg.save_every is not None:
        shutil.rmtree(partial, ignore_errors=True)
        ckpt_dir.mkdir(parents=True)

    def save_checkpoint(step: int, peft_model: Any) -> None:
        meta = {**base_meta, "step": step, "steps": n_steps}
        save_adapter(peft_model, ckpt_dir / f"step-{step:06d}", spec, meta, force=True, continued_from=init)

    if on_start is not None:
        on_start(len(chats), n_steps)
    res = train_lora(hf, tok, chats, cfg, on_step, on_checkpoint=save_checkpoint)
    h = res.history
    meta = {
        **base_meta,
        "examples": res.examples,
        "truncated": res.truncated,
        "step": len(h),
        "steps": len(h),
        "first_loss": round(h[0].loss, 4),
        "final_loss": round(res.final_loss, 4),
        "tokens": h[-1].tokens,
        "seconds": round(h[-1].seconds, 1),
        "tokens_per_s": round(h[-1].tokens_per_s, 1),
        "device": str(next(hf.parameters()).device),
        "torch": torch.__version__,
    }
    if dtype != torch.float32:
        meta["dtype"] = dtype_name(dtype)
    path = save_adapter(res.model, out, spec, meta, force, continued_from=init, extra={"checkpoints": ckpt_dir} if cfg.save_every is not None else None)
    shutil.rmtree(partial, ignore_errors=True)
    return path, res


def checkpoints(run: str | os.PathLike) -> list[tuple[int, Path]]:
    """The checkpoints of a run folder, (step, folder) by step; a run without checkpoints is one
    point, its final adapter at the step its ``steerkit-finetune.json`` records."""
    r = Path(run).expanduser()
    found: list[tuple[int, Path]] = []
    for d in sorted((r / "checkpoints").glob("step-*")):
        if (d / ADAPTER_CONFIG).is_file():
            try:
                found.append((int(d.name.split("-", 1)[1]), d))
            except ValueError:
                continue
    if found:
        return sorted(found)
    if not is_adapter_dir(r):
        raise SteerkitError(f"{r} is neither a LoRA adapter folder nor a run with checkpoints/: give a folder written by steerkit finetune")
    try:
        step = int(json.loads((r / META_FILE).read_text()).get("steps", 0))
    except (OSError, ValueError):
        step = 0
    return [(step, r)]
