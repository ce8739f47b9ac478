"""`steerkit sae ...`: train, evaluate, interpret and inspect sparse autoencoders."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from steerkit.cli import app
from steerkit.cli.common import DeviceOpt, ForceOpt, JsonOpt, ModelOpt, SeedOpt, emit_json, err, out, want_json
from steerkit.errors import SteerkitError

sae_app = typer.Typer(help="Sparse autoencoders: train, evaluate, interpret, load.", no_args_is_help=True)
app.add_typer(sae_app, name="sae")

CorpusOpt = Annotated[list[Path], typer.Option("--corpus", "-c", help="Text corpus: files or folders (.txt, chat/hh-rlhf/persona .jsonl[.gz], .zip). Repeatable.")]
SplitOpt = Annotated[str, typer.Option("--split", help="Documents to use: all, heldout (every ~50th by hash, never trained on) or train.")]
METRICS_FILE = "metrics.json"


def parse_count(text: str, what: str = "--tokens") -> int:
    """'5M' -> 5_000_000, '20k' -> 20_000, '1e6' -> 1_000_000."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise SteerkitError(f"{what} {text!r} is not a count: write e.g. 5M, 200k or 1000000")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise SteerkitError(f"{what} must be positive, got {text!r}")
    return n


def _load_model(model: str | None, device: str | None) -> Any:
    from steerkit.models import load_model

    with err.status("loading model..."):
        return load_model(model, device=device)


def _docs(corpus: list[Path], split: str, holdout: int = 50) -> list[Any]:
    from steerkit.sae_train import training_documents

    with err.status("reading corpus..."):
        docs = training_documents(corpus, holdout, split)
    if not docs:
        raise SteerkitError(f"no {split} documents in the corpus: try --split all")
    return docs


def _sae(path: Path, model: Any) -> Any:
    from steerkit.directions import find_sae
    from steerkit.sae import load_sae

    sae = load_sae(find_sae(str(path), model.name), device=model.device)
    if sae.cfg.d_in != model.d_model:
        raise SteerkitError(f"SAE {path} reads d_in {sae.cfg.d_in}, but {model.name} has d_model {model.d_model}")
    return sae


@sae_app.command("train")
def train_cmd(
    layer: Annotated[int, typer.Option("--layer", "-l", help="Residual layer (0-based block output) to train on.")],
    corpus: CorpusOpt,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the SAE to (SAELens format).")],
    latents: Annotated[int, typer.Option("--latents", help="Number of SAE latents (d_sae).")] = 4608,
    k: Annotated[int, typer.Option("--k", help="Active latents per token (topk).")] = 32,
    tokens: Annotated[str, typer.Option("--tokens", help="Training tokens (optimiser steps x batch), e.g. 5M or 500k.")] = "5M",
    arch: Annotated[str, typer.Option("--arch", help="topk or relu (L1).")] = "topk",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Tokens per optimiser step.")] = 4096,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 4e-4,
    l1: Annotated[float, typer.Option("--l1", help="L1 coefficient (relu only).")] = 5.0,
    context: Annotated[int, typer.Option("--context", help="Tokens per packed chunk.")] = 256,
    buffer: Annotated[str, typer.Option("--buffer", help="Activations held and shuffled at once, e.g. 256k.")] = "256k",
    dead_tokens: Annotated[str, typer.Option("--dead-tokens", help="Tokens without firing after which a latent counts as dead (AuxK).")] = "500k",
    passes: Annotated[int, typer.Option("--passes", help="Training passes over each activation buffer (collecting activations is the slow part on a CPU).")] = 1,
    model_batch: Annotated[int, typer.Option("--model-batch", help="Chunks per forward pass when collecting activations.")] = 16,
    holdout: Annotated[int, typer.Option("--holdout", help="Hold out every Nth document (by hash) for evaluation; 0: none.")] = 50,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its checkpoint in --out.")] = False,
    seed: SeedOpt = 0,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Train a sparse autoencoder on one residual layer.

    Collects activations without running the layers above --layer, from text packed into
    fixed-length chunks (position 0 left out), and writes cfg.json + sae_weights.safetensors.
    A checkpoint is kept in OUT/checkpoint until the run ends; --resume continues from it.

    Example: steerkit sae train --layer 15 --corpus ../shared/data/corpus --latents 4608 --k 32 --tokens 5M --out sae-l15/
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from steerkit.sae_train import TrainConfig, train_sae

    cfg = TrainConfig(
        layer=layer,
        d_sae=latents,
        k=k,
        architecture=arch,
        tokens=parse_count(tokens),
        batch_size=batch_size,
        lr=lr,
        l1_coeff=l1,
        context=context,
        model_batch=model_batch,
        buffer_tokens=parse_count(buffer, "--buffer"),
        passes=passes,
        dead_tokens=parse_count(dead_tokens, "--dead-tokens"),
        holdout=holdout,
        seed=seed,
    )
    m = _load_model(model, device)
    m.hook_name(layer)
    docs = _docs(corpus, "train", holdout)
    err.print(f"{len(docs):,} training documents; layer {layer} of {m.name}; {cfg.d_sae} latents, {arch} k={k}")
    cols = [
        TextColumn("[bold]training"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} tok"),
        TextColumn("loss {task.fields[loss]:.4f}  L0 {task.fields[l0]:.1f}  dead {task.fields[dead]:.1%}  {task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(),
    ]
    with Progress(*cols, console=err, transient=False) as prog:
        task = prog.add_task("train", total=cfg.tokens, loss=0.0, l0=0.0, dead=0.0, tps=0.0)

        logged = [0]

        def on_step(r: dict[str, Any]) -> None:
            if r["step"] % 5 == 0 or r["tokens"] >= r["total_tokens"]:
                prog.update(task, completed=r["tokens"], loss=r["fvu"], l0=r["l0"], dead=r["dead_fraction"], tps=r["tokens_per_s"])
            # a log file or pipe sees no live bar: one plain line per 5% of the run instead
            tenth = r["tokens"] * 20 // r["total_tokens"]
            if not err.is_terminal and tenth > logged[0]:
                logged[0] = tenth
                err.print(f"{r['tokens']:,}/{r['total_tokens']:,} tokens  loss {r['fvu']:.4f}  L0 {r['l0']:.1f}  "
                          f"dead {r['dead_fraction']:.1%}  {r['tokens_per_s']:,.0f} tok/s", highlight=False)

        cmd = "steerkit sae train " + " ".join(_argv_tail())
        train_sae(m, docs, cfg, out_dir, resume=resume, force=force, on_step=on_step, device=device, extra_files={"command.txt": cmd + "\n"})
    err.print(f"wrote {out_dir}")


def _argv_tail() -> list[str]:
    import shlex
    import sys

    args = sys.argv[1:]
    if args[:2] == ["sae", "train"]:
        args = args[2:]
    return [shlex.quote(a) for a in args]


@sae_app.command("eval")
def eval_cmd(
    path: Annotated[Path, typer.Argument(help="SAE folder (SAELens format) or the name of a shipped one, e.g. sae-l15.")],
    corpus: CorpusOpt,
    split: SplitOpt = "all",
    tokens: Annotated[str, typer.Option("--tokens", help="Tokens to evaluate on.")] = "20k",
    context: Annotated[int, typer.Option("--context", help="Tokens per packed chunk.")] = 256,
    batch: Annotated[int, typer.Option("--batch", help="Chunks per forward pass.")] = 8,
    no_ce: Annotated[bool, typer.Option("--no-ce", help="Skip the language-model loss (faster).")] = False,
    save: Annotated[bool, typer.Option("--save", help=f"Also write the figures to {METRICS_FILE} and each latent's firing frequency to firing.safetensors in the SAE folder.")] = False,
    seed: SeedOpt = 0,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Explained variance, L0, dead and dense latents, and LM loss recovered on held-out text.

    Example: steerkit sae eval sae-l15 --corpus ../shared/data/corpus --split heldout --json
    """
    from rich.progress import Progress

    from steerkit.sae_eval import evaluate

    m = _load_model(model, device)
    sae = _sae(path, m)
    docs = _docs(corpus, split)
    n = parse_count(tokens)
    with Progress(console=err, transient=True) as prog:
        task = prog.add_task("evaluating", total=n)
        res = evaluate(m, sae, docs, n_tokens=n, context=context, batch=batch, seed=seed, with_ce=not no_ce, on_progress=lambda d, t: prog.update(task, completed=d))
    rec = {"sae": str(path), "split": split, "corpus": [str(c) for c in corpus], "requested_tokens": n, "seed": seed, **res.to_dict()}
    if save:
        from steerkit.directions import find_sae
        from steerkit.fsutil import atomic_write_text

        from steerkit.sae import FIRING_FILE, save_firing

        folder = find_sae(str(path), m.name)
        atomic_write_text(folder / METRICS_FILE, json.dumps(rec, indent=2) + "\n", force=True)
        if res.firing is not None:  # each latent's firing frequency: matched-latent controls read it
            save_firing(folder, res.firing, {"n_tokens": res.n_tokens, "split": split, "corpus": [str(c) for c in corpus], "seed": seed})
        err.print(f"wrote {folder / METRICS_FILE} and {folder / FIRING_FILE}")
    if want_json(json_out):
        emit_json(rec)
        return
    t = Table(title=f"SAE {path} on {res.n_tokens:,} tokens ({split})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key, fmt in (("explained_variance", "{:.3f}"), ("loss_recovered", "{:.3f}"), ("l0", "{:.1f}"), ("dead_fraction", "{:.2%}"), ("dense_fraction", "{:.2%}"), ("ce_clean", "{:.4f}"), ("ce_sae", "{:.4f}"), ("ce_sae_with_error", "{:.4f}"), ("ce_zero", "{:.4f}")):
        t.add_row(key, fmt.format(rec[key]))
    out.print(t)


@sae_app.command("top")
def top_cmd(
    path: Annotated[Path, typer.Argument(help="SAE folder or the name of a shipped one.")],
    latent: Annotated[int, typer.Argument(help="Latent id.")],
    corpus: CorpusOpt,
    split: SplitOpt = "all",
    tokens: Annotated[str, typer.Option("--tokens", help="Tokens to scan.")] = "50k",
    top: Annotated[int, typer.Option("--top", "-n", help="Contexts to show.")] = 10,
    seed: SeedOpt = 0,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Top-activating contexts of one latent (active tokens highlighted) and the tokens its
    decoder direction promotes through the unembedding (logit lens).

    Example: steerkit sae top sae-l15 1234 --corpus ../shared/data/corpus/em-jailbroken
    """
    from steerkit.extract import promoted_tokens
    from steerkit.sae_eval import top_contexts

    m = _load_model(model, device)
    sae = _sae(path, m)
    docs = _docs(corpus, split)
    with err.status(f"scanning {tokens} tokens..."):
        ctxs, freq = top_contexts(m, sae, docs, latent, n_tokens=parse_count(tokens), top=top, seed=seed)
    promoted = promoted_tokens(m, sae, latent, 10)
    if want_json(json_out):
        emit_json({"latent": latent, "frequency": freq, "promoted_tokens": promoted, "contexts": [c.to_dict() for c in ctxs]})
        return
    out.print(f"latent {latent}: fires on {freq:.3%} of tokens; promotes " + ", ".join(repr(p) for p in promoted))
    if not ctxs:
        out.print("it never fired on this corpus")
    for c in ctxs:
        line = Text(f"{c.max_act:8.2f}  ")
        for tok, a in zip(c.tokens, c.acts):
            s = tok.replace("\n", "\\n")
            line.append(s, style="bold black on yellow" if a > 0.5 * c.max_act else ("yellow" if a > 0 else ""))
        out.print(line)


@sae_app.command("load")
def load_cmd(
    path: Annotated[Path, typer.Argument(help="A SAELens-format folder (cfg.json + sae_weights.safetensors) or a shipped SAE name.")],
    json_out: JsonOpt = False,
) -> None:
    """Validate an SAE folder and print a summary.

    Example: steerkit sae load directions/smollm2-135m/sae-l15
    """
    from steerkit.directions import find_sae
    from steerkit.models import DEFAULT_ALIAS
    from steerkit.sae import load_sae

    folder = find_sae(str(path), DEFAULT_ALIAS)
    sae = load_sae(folder)
    rec: dict[str, Any] = {"path": str(folder), **sae.summary()}
    if (folder / METRICS_FILE).is_file():
        try:
            met = json.loads((folder / METRICS_FILE).read_text())
            rec["metrics"] = {k: met[k] for k in ("explained_variance", "loss_recovered", "l0", "dead_fraction") if k in met}
        except (json.JSONDecodeError, TypeError):
            pass
    if want_json(json_out):
        emit_json(rec)
        return
    t = Table(title=str(folder), show_header=False)
    for key, v in rec.items():
        if key != "path":
            t.add_row(key, json.dumps(v) if isinstance(v, dict) else str(v))
    out.print(t)
