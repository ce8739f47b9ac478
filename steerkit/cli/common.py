"""Shared CLI pieces: the console, option aliases and output helpers (steering specs are
:mod:`steerkit.steering_spec`'s).

Only the CLI imports typer and rich; the library raises SteerkitError and the error boundary in
:func:`steerkit.cli.main` turns it into one red line and exit code 1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from steerkit import judge as J
from steerkit.errors import SteerkitError

# messages, tables and progress go to stderr; stdout carries results (text or JSON Lines)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Model: alias (smollm2-135m), local HF folder, .gguf file or hub id.", show_default="smollm2-135m"),
]
LayerOpt = Annotated[Optional[int], typer.Option("--layer", "-l", help="Residual layer (0-based block output); overrides the direction file's layer.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed: same seed, same output.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON Lines on stdout (the default when stdout is not a terminal).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
AnyModelOpt = Annotated[bool, typer.Option("--any-model", help="Use directions made for another model of the same d_model.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="torch device: cpu, cuda, cuda:N, mps, or auto (a model too big for one GPU: its layers spread over every GPU, then CPU RAM, by Hugging Face's device_map=\"auto\"; needs accelerate). Default: cuda if available, else cpu.")]


def _dtype_option(value: str) -> str:
    """--dtype checked as the command line is parsed (before anything loads): its canonical name."""
    from steerkit.models import check_dtype, dtype_name

    try:
        return dtype_name(check_dtype(value))
    except SteerkitError:
        raise typer.BadParameter(f"{value!r} is not one of float32, bfloat16, float16 (or bf16, fp16)") from None


DtypeOpt = Annotated[str, typer.Option("--dtype", callback=_dtype_option, help="The model's weights: float32, bfloat16 or float16 (bf16, fp16); half precision halves the memory of a big model on a GPU. Steering, SAE and activation arithmetic stays float32 either way.")]


JudgeDtypeOpt = Annotated[str, typer.Option("--judge-dtype", callback=_dtype_option, help="The offline judge's reader weights: float32 (what its heads were fitted on) or bfloat16 (2x faster on a CPU with AVX-512 BF16, as measured here, and far slower on one without: steerkit says so when it loads; the same call on 878 of 879 read answers). Records name it in their judge field.")]


def want_json(flag: bool) -> bool:
    """JSON Lines when asked for, or when stdout is piped or redirected."""
    return flag or not sys.stdout.isatty()


def emit_json(record: Any) -> None:
    sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def load_judge_kind(kind: str, questions: Any = None, dtype: str = "float32") -> Any:
    """The judge of ``--judge KIND`` (one of :data:`steerkit.judge.KINDS`) for commands that can go
    on without one (sweep, track): None for ``none``; ``auto`` loads the offline judge or, where it
    cannot load, says why in one yellow line and gives None. ``questions``: the endpoint judge reads
    the judge prompts of an emergent-misalignment YAML question file; ``dtype``: the offline
    judge's reader weights."""
    with err.status(f"loading the {kind} judge..."):
        opts = {"questions": questions} if kind == "endpoint" and questions is not None and questions.suffix.lower() in (".yaml", ".yml") else {}
        if kind in ("offline", "auto") and dtype != "float32":
            opts["dtype"] = dtype
        try:
            return J.load_judge("offline" if kind == "auto" else kind, **opts)
        except (SteerkitError, ImportError) as e:
            if kind != "auto":
                raise
            from rich.text import Text

            err.print(Text(f"no judge ({e}): answers are generated but not scored, as with --judge none", style="yellow"))
            return None


def print_error(message: str, color: str = "red") -> None:
    """One line on stderr; the message is printed as text, never parsed as Rich markup."""
    from rich.text import Text

    label = "error: " if color == "red" else ""
    err.print(Text(label, style=f"bold {color}") + Text(message), soft_wrap=True)


def debug() -> bool:
    return os.environ.get("STEERKIT_DEBUG", "") not in ("", "0")


def target_dir(out_dir: Path | None, model_name: str) -> Path:
    """Where a command saves a direction: ``--out-dir``, else the user's folder for the model."""
    if out_dir is not None:
        return out_dir
    from steerkit.directions import user_root

    return user_root() / model_name


def rel_path(path: Path, target: Path) -> str:
    """``path`` relative to ``target`` (a saved direction names its SAE this way), else absolute."""
    try:
        return os.path.relpath(path.resolve(), target.resolve())
    except ValueError:  # another drive
        return str(path.resolve())


def load_with_status(model: str | None, device: str | None, dtype: str = "float32") -> Any:
    """Load a model spec with a spinner on stderr (``steerkit generate`` and ``serve``)."""
    from steerkit.models import load_model

    with err.status(f"loading {model or 'smollm2-135m'}" + ("" if dtype == "float32" else f" in {dtype}") + "..."):
        return load_model(model, device=device, dtype=dtype)
