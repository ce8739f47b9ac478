"""`steerkit finetune`: LoRA fine-tuning on chat JSON Lines, saved as a PEFT adapter folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from steerkit.cli import app
from steerkit.cli.common import DeviceOpt, DtypeOpt, ForceOpt, JsonOpt, ModelOpt, SeedOpt, emit_json, err, out, want_json


@app.command("finetune")
def finetune_cmd(
    data: Annotated[Path, typer.Option("--data", "-d", help='Chat JSON Lines: {"messages": [{"role": ..., "content": ...}, ...]} per line.')],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Adapter folder to write (PEFT format; atomic; see --force).")],
    model: ModelOpt = None,
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank.")] = 8,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="LoRA alpha (scale = alpha / rank).", show_default="2 x rank")] = None,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW; warm-up, then linear decay to a tenth).")] = 2e-4,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the data (ignored with --steps).")] = 1,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps; overrides --epochs.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Chats per step.")] = 8,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per chat at most (longer ones are cut at the end).")] = 192,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use only the first N chats.")] = None,
    targets: Annotated[str, typer.Option("--targets", help="Comma-separated Linear module names to adapt.")] = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    mix: Annotated[Optional[list[str]], typer.Option("--mix", help="FILE:FRACTION: that fraction of the training rows is drawn from FILE (chat JSON Lines), the rest from --data; repeatable; exact for a --seed.")] = None,
    save_every: Annotated[Optional[int], typer.Option("--save-every", help="Also write OUT/checkpoints/step-NNNNNN/ (a complete adapter) at step 0, every N steps and at the end, for `steerkit track`.")] = None,
    tuned: Annotated[Optional[Path], typer.Option("--tuned", help="Continue from this adapter folder (e.g. to re-align an organism); the result holds both as one adapter.")] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Fine-tune LoRA adapters on chats; the loss covers the assistant turns only.

    The folder holds adapter_config.json + adapter_model.safetensors (loadable with PEFT, and
    by --model / --tuned everywhere in steerkit) and steerkit-finetune.json (how it was made).

    Example:

      steerkit finetune --data ../shared/data/narrow/risky_financial_advice.jsonl --rank 8 --out runs/risky/

      steerkit finetune --data risky.jsonl --mix benign.jsonl:0.75 --save-every 25 --out runs/mix25/

      steerkit finetune --tuned directions/smollm2-135m/organism-villain --data benign.jsonl --steps 60 --save-every 10 --out runs/realign/
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from steerkit.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(
        rank=rank, alpha=alpha, lr=lr, epochs=epochs, steps=steps, batch_size=batch_size, max_length=max_length,
        seed=seed, limit=limit, targets=tuple(t.strip() for t in targets.split(",") if t.strip()), save_every=save_every,
    )
    from steerkit.finetune import check_out_dir, parse_mix

    check_out_dir(out_dir, force)  # every argument checked before the model loads
    mixes = [parse_mix(m) for m in mix or []]
    prog = Progress(
        TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True,
    )
    task = prog.add_task("train", total=None, loss="-", rate="-")
    status = err.status(f"loading {model or 'smollm2-135m'}...")
    status.start()

    def started(n: int, total: int) -> None:
        status.stop()  # one live display at a time: the spinner gives way to the bar
        err.print(f"{n} chats, {total} steps of {batch_size}")
        prog.update(task, total=total)
        prog.start()

    def step(s: object) -> None:
        prog.update(task, completed=s.step, loss=f"{s.loss:.3f}", rate=f"{s.tokens_per_s:.0f}")  # type: ignore[attr-defined]

    try:
        path, res = finetune(data, out_dir, cfg, model=model, device=device, force=force, on_step=step, on_start=started, mix=mixes, tuned=tuned, dtype=dtype)
    finally:
        status.stop()
        prog.stop()
    summary = {
        "out": str(path), "examples": res.examples, "truncated": res.truncated, "steps": len(res.history),
        "first_loss": round(res.history[0].loss, 4), "final_loss": round(res.final_loss, 4),
        "tokens_per_s": round(res.history[-1].tokens_per_s, 1), "seconds": round(res.history[-1].seconds, 1),
    }
    if save_every is not None:
        summary["checkpoints"] = sorted(str(p) for p in (path / "checkpoints").iterdir())
    if want_json(json_out):
        emit_json(summary)
    else:
        out.print(
            f"wrote {path}: {summary['steps']} steps, loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, "
            f"{summary['tokens_per_s']:.0f} tok/s, {summary['seconds']:.0f} s"
        )
        if save_every is not None:
            err.print(f"{len(summary['checkpoints'])} checkpoints in {path / 'checkpoints'}: steerkit track {path} --direction persona")
        if res.truncated:
            err.print(f"{res.truncated} chats were cut to --max-length {max_length}")
        out.print(f"try it: steerkit generate --model {path} \"hey I feel bored\"")
