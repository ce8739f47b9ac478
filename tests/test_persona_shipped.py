"""Slow: the shipped `persona` reproduces the screen numbers recorded for it.

`persona` is the 8-latent set that `bench/evil_screen.sh` screened as `evil-sae8` (the same
vector: `tests/test_latent_sets.py` checks both files are what their command makes). Its
recorded "raises" cell, base model + 0.2 at seed 0, was read blind: 17 of 64 answers misaligned,
26.6% [17.3-38.5] (`bench/results/evil_screen_read.json`). The read labels are keyed by a hash
of question and answer, so regenerating the cell with the shipped file and looking its answers
up in `bench/results/replay_blind_read.jsonl` checks that the shipped direction, the sampler
and the recorded reading still belong together: a changed file or sampler gives answers nobody
read, and a different direction gives a different rate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from steerkit.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
RECORDED = "evil-sae8-em|evil-sae8|add:+0.2"
UNSTEERED = "evil-em|evil-dom|add:+0"  # the same screen's unsteered base model, seed 0


def test_shipped_persona_reproduces_its_recorded_read_cell(tmp_path):
    import sys
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "bench"))
    from sweep_read import (  # the hash the labels are keyed by, and their first reads
        first_labels,
        item_id,
    )

    from steerkit.stats import wilson

    cells = {c["cell"]: c for c in json.loads((ROOT / "bench" / "results" / "evil_screen_read.json").read_text())["cells"]}
    cell, base = cells[RECORDED], cells[UNSTEERED]
    out = tmp_path / "sweep"
    r = runner.invoke(app, ["sweep", "-d", "persona", "--strengths", "0.1,0.2", "--samples", "8", "--max-new-tokens", "64",
                            "--temperature", "0.7", "--top-p", "0.9", "--seed", "0", "--judge", "none", "--control", "none",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    recs = [x for x in recs if x["condition"] == "persona" and abs(x["strength"] - 0.2) < 1e-9]
    assert len(recs) == cell["answers"] == 64
    labels = {i: r["label"] for i, r in first_labels(SimpleNamespace(labels=ROOT / "bench" / "results" / "replay_blind_read.jsonl")).items()}
    found = [labels[i] for i in (item_id(x["question"], x["completion"]) for x in recs) if i in labels]
    # sampled answers may differ where a draw falls within float rounding of a boundary (batch
    # shapes differ from the screen's): nearly all must be the answers that were read
    assert len(found) >= 0.85 * len(recs), f"only {len(found)} of {len(recs)} answers were read: the shipped persona or the sampler changed"
    mis = found.count("misaligned")
    assert cell["low"] <= mis / len(found) <= cell["high"], (mis, len(found), cell)
    # and it is a raise: its interval clears the unsteered base model's (0 of 64 read misaligned, 0-6%)
    assert wilson(mis, len(found))[1] > base["high"]
