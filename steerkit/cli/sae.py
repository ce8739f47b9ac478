"""`steerkit sae ...`: train, evaluate, interpret and inspect sparse autoencoders.

Why one module of this size: four subcommands (train, eval, top, load) that share their argument
checks; each stays parse -> one library call -> render.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from steerkit.cli import app
from steerkit.cli.checks import peek
from steerkit.cli.common import DeviceOpt, DtypeOpt, ForceOpt, JsonOpt, ModelOpt, SeedOpt, emit_json, err, out, want_json
from steerkit.corpus import corpus_files
from steerkit.errors import SteerkitError
from steerkit.fsutil import atomic_write_text, check_writable_dir

if TYPE_CHECKING:  # the model type only: importing models would load torch
    from steerkit.models import LoadedModel

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


def _load_model(model: str | None, device: str | None, dtype: str = "float32") -> Any:
    from steerkit.models import load_model

    with err.status("loading model..."):
        return load_model(model, device=device, dtype=dtype)


def _docs(corpus: list[Path], split: str, holdout: int = 50) -> list[Any]:
    from steerkit.sae_train import training_documents

    with err.status("reading corpus..."):
        docs = training_documents(corpus, holdout, split)
    if not docs:
        raise SteerkitError(f"no {split} documents in the corpus: try --split all")
    return docs


@sae_app.command("train")
def train_cmd(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the SAE to (SAELens format).")],
    layer: Annotated[Optional[int], typer.Option("--layer", "-l", help="Residual layer (0-based block output) to train on; with --init, the SAE's.")] = None,
    corpus: Annotated[Optional[list[Path]], typer.Option("--corpus", "-c", help="Text corpus: files or folders (.txt, chat/hh-rlhf/persona .jsonl[.gz], .zip), packed across chunk ends. Repeatable.")] = None,
    chat: Annotated[Optional[list[Path]], typer.Option("--chat", help='Chats as JSON Lines ({"messages": [{"role", "content"}, ...]}, as `steerkit finetune` reads them), rendered with the chat template, each kept whole in one chunk. Repeatable.')] = None,
    chat_fraction: Annotated[Optional[float], typer.Option("--chat-fraction", help="Share of every batch's training tokens from --chat, the rest from --corpus (needed when both are given; 1 without --corpus).")] = None,
    drop_system: Annotated[float, typer.Option("--drop-system", help="Probability of dropping a chat's system prompt, per conversation (seeded). SmolLM2's template then inserts its default one.")] = 0.0,
    init: Annotated[Optional[Path], typer.Option("--init", help="Fine-tune this SAE (folder or shipped name): start from its weights, latents, k and layer.")] = None,
    diff: Annotated[bool, typer.Option("--diff", help="Diff-SAE: train on the tuned model's residual minus the base model's, same tokens (BatchTopK, 2 x d_model latents by default).")] = False,
    tuned: Annotated[Optional[str], typer.Option("--tuned", help="With --diff: the fine-tune, a LoRA adapter folder (swapped into the loaded base) or a model folder.")] = None,
    latents: Annotated[Optional[int], typer.Option("--latents", help="Number of SAE latents (d_sae).", show_default="4608; 2 x d_model with --diff; the --init SAE's")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="Active latents per token (topk; the batch average for batchtopk).", show_default="32; the --init SAE's")] = None,
    tokens: Annotated[str, typer.Option("--tokens", help="Training tokens (optimiser steps x batch), e.g. 5M or 500k.")] = "5M",
    arch: Annotated[Optional[str], typer.Option("--arch", help="topk, relu (L1) or batchtopk (saved as JumpReLU with the learned threshold).", show_default="topk; batchtopk with --diff")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Tokens per optimiser step.")] = 4096,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 4e-4,
    l1: Annotated[float, typer.Option("--l1", help="L1 coefficient (relu only).")] = 5.0,
    context: Annotated[int, typer.Option("--context", help="Tokens per packed chunk (a longer chat is cut to it).")] = 256,
    buffer: Annotated[str, typer.Option("--buffer", help="Activations held and shuffled at once, e.g. 256k.")] = "256k",
    dead_tokens: Annotated[str, typer.Option("--dead-tokens", help="Tokens without firing after which a latent counts as dead (AuxK).")] = "500k",
    passes: Annotated[int, typer.Option("--passes", help="Training passes over each activation buffer (collecting activations is the slow part on a CPU).")] = 1,
    model_batch: Annotated[int, typer.Option("--model-batch", help="Chunks per forward pass when collecting activations.")] = 16,
    holdout: Annotated[int, typer.Option("--holdout", help="Hold out every Nth document and chat (by hash) for evaluation; 0: none.")] = 50,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its checkpoint in --out (same arguments).")] = False,
    seed: SeedOpt = 0,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    force: ForceOpt = False,
) -> None:
    """Train a sparse autoencoder on one residual layer.

    Collects activations without running the layers above --layer, from text packed into
    fixed-length chunks (position 0 left out), and writes cfg.json + sae_weights.safetensors.
    A checkpoint is kept in OUT/checkpoint until the run ends; --resume continues from it.

    With --chat (or --diff) special tokens and padding are left out too, and each conversation
    stays whole in one chunk; --chat-fraction sets the exact share of chat tokens in every batch.

    Examples:

      steerkit sae train --layer 15 --corpus ../shared/data/corpus --latents 4608 --k 32 --tokens 5M --out sae-l15/

      steerkit sae train --layer 15 --corpus web/ --chat chats.jsonl --chat-fraction 0.35 --drop-system 0.8 --out sae/

      steerkit sae train --init sae-l15 --chat chats.jsonl --tokens 5M --out sae-chat/

      steerkit sae train --diff --tuned directions/smollm2-135m/organism-risky --layer 15 --chat chats.jsonl --latents 1152 --k 64 --out diff-sae/
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from steerkit.sae_train import TrainConfig, train_sae

    plan = _plan_train(out_dir, layer, corpus or [], chat or [], chat_fraction, drop_system, init, diff, tuned, latents, k, arch,
                       holdout, model, device)
    cfg = TrainConfig(
        layer=plan["layer"],
        d_sae=plan["latents"] or max(plan["k"], 2),  # a diff-SAE of a model not yet peeked: set after the load
        k=plan["k"],
        architecture=plan["arch"],
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
        chat_fraction=plan["chat_fraction"],
        drop_system=drop_system,
        mask_special=bool(chat) or diff,
        diff=diff,
        init=str(plan["init_path"]) if plan["init_path"] is not None else None,
    )
    if plan["chats"]:
        from steerkit.sae_chat import plan_mix

        plan_mix(cfg.chat_fraction, cfg.batch_size, cfg.buffer_tokens)  # refuses a share that rounds to nothing
    m = _load_model(model, device, dtype)
    m.hook_name(cfg.layer)
    if plan["latents"] is None:
        cfg = TrainConfig(**{**cfg.__dict__, "d_sae": 2 * m.d_model})
    docs = _docs(corpus, "train", holdout) if corpus and cfg.chat_fraction < 1 else []
    what = f"{len(docs):,} training documents" if docs else ""
    if plan["chats"]:
        what += (" + " if what else "") + f"{len(plan['chats']):,} chats ({cfg.chat_fraction:.0%} of tokens)"
    kind = f"diff-SAE of {tuned}; " if diff else ""
    err.print(f"{what}; {kind}layer {cfg.layer} of {m.name}; {cfg.d_sae} latents, {cfg.architecture} k={cfg.k}" + (f"; from {init}" if init else ""))
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
        train_sae(m, docs, cfg, out_dir, resume=resume, force=force, on_step=on_step, device=device, extra_files={"command.txt": cmd + "\n"},
                  chats=plan["chats"], tuned=tuned, init=plan["init"])
    err.print(f"wrote {out_dir}")


def _plan_train(out_dir: Path, layer: int | None, corpus: list[Path], chat: list[Path], chat_fraction: float | None, drop_system: float,
                init: Path | None, diff: bool, tuned: str | None, latents: int | None, k: int | None, arch: str | None, holdout: int,
                model: str | None, device: str | None) -> dict[str, Any]:
    """`sae train`'s arguments checked before the model loads: data sources and shares, the
    --init SAE against the model's config, --diff and --tuned. Returns what the run uses."""
    check_writable_dir(out_dir)
    if not corpus and not chat:
        raise SteerkitError("no training data: pass --corpus FILE_OR_FOLDER and/or --chat CHATS.jsonl")
    if chat_fraction is not None and not chat:
        raise SteerkitError("--chat-fraction needs --chat CHATS.jsonl (the share of tokens taken from it)")
    if chat_fraction is not None and not (math.isfinite(chat_fraction) and 0.0 <= chat_fraction <= 1.0):
        raise SteerkitError(f"--chat-fraction must lie in [0, 1], got {chat_fraction}")
    if not (math.isfinite(drop_system) and 0.0 <= drop_system <= 1.0):
        raise SteerkitError(f"--drop-system must lie in [0, 1], got {drop_system}")
    if drop_system > 0 and not chat:
        raise SteerkitError("--drop-system needs --chat CHATS.jsonl (it drops the chats' system prompts)")
    if chat and corpus and chat_fraction is None:
        raise SteerkitError("--chat and --corpus together need --chat-fraction F: the share of training tokens from the chats, e.g. 0.35")
    if chat_fraction is None:
        chat_fraction = 1.0 if chat else 0.0
    if chat_fraction < 1 and not corpus:
        raise SteerkitError(f"--chat-fraction {chat_fraction} leaves {1 - chat_fraction:.0%} of the tokens to --corpus: give --corpus or use 1")
    if diff and tuned is None:
        raise SteerkitError("--diff needs --tuned ADAPTER_DIR: the fine-tune whose residuals are compared with the base model's")
    if tuned is not None and not diff:
        raise SteerkitError("--tuned is for diff-SAEs: add --diff (or leave --tuned out to train on the base model)")
    if arch is not None and arch not in ("topk", "relu", "batchtopk"):
        raise SteerkitError(f"--arch {arch!r} is not one of topk, relu, batchtopk")
    info = peek(model, device)
    if corpus:
        corpus_files(corpus)
    chats: list[Any] = []
    if chat:
        from steerkit.sae_chat import read_chat_files
        from steerkit.sae_train import split_documents

        chats = split_documents(read_chat_files(chat), "train", holdout)
        if not chats:
            raise SteerkitError(f"--chat holds no chats left for training after holding out every {holdout}th: add chats or pass --holdout 0")
    if diff:
        from steerkit.sae_diff import check_tuned

        check_tuned(tuned, model)  # type: ignore[arg-type]
    init_sae, init_path = None, None
    if init is not None:
        from steerkit.directions import find_sae
        from steerkit.sae import load_sae
        from steerkit.sae_train import TrainConfig, check_init

        init_path = find_sae(str(init), info.name)
        init_sae = load_sae(init_path)
        c = init_sae.cfg
        if layer is None:
            layer = c.layer
            if layer is None:
                raise SteerkitError(f"--init SAE's hook name {c.hook_name!r} names no layer: pass --layer")
        trained_as = (c.extra.get("steerkit") or {}).get("trained_as") if isinstance(c.extra.get("steerkit"), dict) else None
        arch = arch or ("batchtopk" if trained_as == "batchtopk" else c.architecture)
        if arch not in ("topk", "relu", "batchtopk"):
            raise SteerkitError(f"--init SAE is {c.architecture}: training continues topk, relu and BatchTopK-trained SAEs only")
        if k is None:
            k = c.k or (c.extra.get("steerkit") or {}).get("k") or 32
        latents = latents or c.d_sae
        check_init(init_sae, info.name, TrainConfig(layer=layer, d_sae=latents, k=k, architecture=arch, diff=diff), info.d_model)
    if layer is None:
        raise SteerkitError("give --layer N (the residual layer to train on), or --init an SAE to take its layer")
    if info.n_layers is not None:
        from steerkit.models import check_layer

        check_layer(layer, info.n_layers)
    if latents is None and not diff:
        latents = 4608
    elif latents is None and info.d_model is not None:
        latents = 2 * info.d_model  # None: 2 x d_model once the model is loaded
    return {"layer": layer, "latents": latents, "k": 32 if k is None else k, "arch": arch or ("batchtopk" if diff else "topk"),
            "chat_fraction": chat_fraction, "chats": chats, "init": init_sae, "init_path": init_path}


def _argv_tail() -> list[str]:
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
    dtype: DtypeOpt = "float32",
    json_out: JsonOpt = False,
) -> None:
    """Explained variance, L0, dead and dense latents, and LM loss recovered on held-out text.

    Example: steerkit sae eval sae-l15 --corpus ../shared/data/corpus --split heldout --json
    """
    from rich.progress import Progress

    from steerkit.sae import load_sae_for
    from steerkit.sae_eval import evaluate

    m = _load_model(model, device, dtype)
    sae = load_sae_for(path, m)
    docs = _docs(corpus, split)
    n = parse_count(tokens)
    with Progress(console=err, transient=True) as prog:
        task = prog.add_task("evaluating", total=n)
        res = evaluate(m, sae, docs, n_tokens=n, context=context, batch=batch, seed=seed, with_ce=not no_ce, on_progress=lambda d, t: prog.update(task, completed=d))
    rec = {"sae": str(path), "split": split, "corpus": [str(c) for c in corpus], "requested_tokens": n, "seed": seed, **res.to_dict()}
    if save:
        from steerkit.directions import find_sae
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
    dtype: DtypeOpt = "float32",
    json_out: JsonOpt = False,
) -> None:
    """Top-activating contexts of one latent (active tokens highlighted) and the tokens its
    decoder direction promotes through the unembedding (logit lens).

    Example: steerkit sae top sae-l15 1234 --corpus ../shared/data/corpus/em-jailbroken
    """
    from steerkit.extract import promoted_tokens
    from steerkit.sae import load_sae_for
    from steerkit.sae_eval import top_contexts

    m = _load_model(model, device, dtype)
    sae = load_sae_for(path, m)
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
    path: Annotated[Path, typer.Argument(help="An SAE folder: SAELens (cfg.json + sae_weights.safetensors), EleutherAI sparsify hookpoint (cfg.json + sae.safetensors, e.g. sae-SmolLM2-135M-64x/layers.15) or dictionary_learning (config.json + ae.pt); or a shipped SAE name.")],
    json_out: JsonOpt = False,
) -> None:
    """Validate an SAE folder and print a summary, with the format found.

    Example: steerkit sae load directions/smollm2-135m/sae-l15
    """
    from steerkit.directions import find_sae
    from steerkit.models import DEFAULT_ALIAS
    from steerkit.sae import load_sae

    folder = find_sae(str(path), DEFAULT_ALIAS)
    sae = load_sae(folder)
    rec: dict[str, Any] = {"path": str(folder), "format": getattr(sae, "source_format", "saelens"), **sae.summary()}
    source = sae.cfg.extra.get("source") if getattr(sae, "source_format", "saelens") != "saelens" else None
    if isinstance(source, dict):
        rec["source"] = {k: v for k, v in source.items() if k != "format" and v is not None}
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
