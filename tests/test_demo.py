"""`steerkit demo --quick` end to end on the default model (slow): the report, both sweeps judged by
the offline judge with every rate also corrected for its measured error, and a rerun that resumes
instead of regenerating."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from steerkit.cli import app

runner = CliRunner()


@pytest.mark.slow
def test_demo_quick_end_to_end_and_resume(tmp_path):
    out = tmp_path / "demo"
    r = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = (out / "report.md").read_text()
    for part in ("## Findings", "## 1. Diffing", "## 2. Adding the direction", "## 3. Removing it", "temperature 0.7", "Rogan-Gladen",
                 "persona-random-pooled (3 draws, each", "random latents of matched firing rate"):
        assert part in report
    for sweep in ("sweep-add", "sweep-organism"):
        recs = [json.loads(x) for x in (out / sweep / "results.jsonl").read_text().splitlines()]
        assert recs and all(isinstance(x["misaligned"], bool) for x in recs)
        assert all(x["judge"].startswith("steerkit-reader ") for x in recs)  # the reader judge
        cfg = json.loads((out / sweep / "sweep.json").read_text())
        assert cfg["sampling"]["temperature"] == 0.7 and cfg["sampling"]["top_p"] == 0.9
        assert 0 < cfg["judge_error"]["sensitivity"] <= 1 and 0 < cfg["judge_error"]["specificity"] <= 1
        rows = list(csv.DictReader((out / sweep / "summary.csv").open()))
        assert sum(int(x["n"]) for x in rows if not int(x["draws"])) == len(recs)  # pooled rows re-count their draws
        # three random draws and their pooled row at every strength; in the organism also three
        # matched random latents ablated, pooled
        ctl = {x["condition"] for x in recs if x["control"]}
        assert {f"persona-random-{i}" for i in (1, 2, 3)} <= ctl
        assert any(x["condition"] == "persona-random-pooled" and int(x["draws"]) == 3 for x in rows)
        if sweep == "sweep-organism":
            assert {f"persona-latents-{i}-ablated" for i in (1, 2, 3)} <= ctl
            assert any(x["condition"] == "persona-latents-ablated-pooled" for x in rows)
        assert all(x["corrected"] != "nan" and 0 <= float(x["corrected"]) <= 1 for x in rows)
    before = (out / "sweep-add" / "results.jsonl").read_text()
    r2 = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert r2.exit_code == 0, r2.output
    assert (out / "sweep-add" / "results.jsonl").read_text() == before  # resumed: nothing generated again
