"""`steerkit demo`: the whole story on the default model, printed and written to a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from steerkit.cli import app
from steerkit.cli.common import DtypeOpt, ForceOpt, JudgeDtypeOpt, SeedOpt, err, out
from steerkit.demo import DemoConfig, run_demo


@app.command("demo")
def demo_cmd(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Report folder (reruns resume from it).")] = Path("runs/demo"),
    samples: Annotated[int, typer.Option("--samples", help="Samples per question per cell (8 questions).")] = 8,
    quick: Annotated[bool, typer.Option("--quick", help="2 samples and shorter answers: a smoke run in about a minute.")] = False,
    direction: Annotated[str, typer.Option("--direction", "-d", help="Direction to steer with.")] = "persona",
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="New tokens per answer (default 48; 24 with --quick).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature (the default model writes a third of its answers unreadable at 1.0).")] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")] = 0.9,
    controls: Annotated[int, typer.Option("--controls", min=1, max=20, help="Random directions (and, for an SAE-latent direction, matched random latents) per control.")] = 3,
    dtype: DtypeOpt = "float32",
    judge_dtype: JudgeDtypeOpt = "float32",
) -> None:
    """Diff the shipped model organism against the base model with the shipped SAE, sweep the
    persona direction up in the base model and down in the organism against controls (three
    random directions of equal norm, pooled; its latent ablated against three random latents of
    matched firing rate),
    judge every answer, and write report.md with tables and plots.

    Example: steerkit demo --out runs/demo
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from steerkit.report import table, text_plot

    cfg = DemoConfig(out_dir=out_dir, samples=2 if quick else samples, seed=seed, force=force, direction=direction,
                     max_new_tokens=max_new_tokens or (24 if quick else 48), temperature=temperature, top_p=top_p,
                     random_controls=controls, latent_controls=controls, dtype=dtype, judge_dtype=judge_dtype)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True) as prog:
        task = prog.add_task("starting", total=None)

        def stage(msg: str) -> None:
            err.print(f"[bold]>[/bold] {msg}")
            prog.update(task, description=msg[:40], completed=0, total=None)

        res = run_demo(cfg, stage=stage, progress=lambda d, t: prog.update(task, completed=d, total=t))
    t = Table(title="1. latents the fine-tune switches on (layer-15 SAE, organism minus base)")
    for c in ("#", "latent", "delta", "fires base/organism", "promotes"):
        t.add_column(c)
    for r in res.diffing["latents"]:
        t.add_row(str(r["rank"]), str(r["latent"]), f"{r['delta']:+.3f}", f"{r['freq_before']:.1%}/{r['freq_after']:.1%}",
                  " ".join(repr(x) for x in r.get("promoted_tokens", [])[:5]))
    out.print(t)
    for title, sw in (("2. persona added to the base model", res.add), ("3. persona removed from the model organism", res.organism)):
        headers, rows = table(sw.rows)
        tt = Table(title=title)
        for h in headers:
            tt.add_column(h)
        for r in rows:
            tt.add_row(*r)
        out.print(tt)
    out.print(text_plot(res.add.rows))
    out.print("[bold]Findings[/bold]")
    for f in res.findings:
        out.print(f"- {f}")
    out.print(f"report: {res.out_dir / 'report.md'} ({res.seconds / 60:.1f} min)")
