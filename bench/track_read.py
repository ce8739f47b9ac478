"""The tracking curves by blind reading: `steerkit track` answers joined with readers' labels.

    python bench/track_read.py runs/curves/track bench/results/track_blind_read.jsonl \
        --out bench/results/track_read.json --plot bench/results/track_read.png
    python bench/track_read.py runs/curves/track bench/results/track_blind_read.jsonl --unread runs/track-read/
        # the answers the labels lack (a changed decoder can sample a few differently), as blind batches

The labels file holds one line per distinct answer read blind ({"item", "label", "reader",
"second"?, "third"?}, item = first 10 hex digits of sha256(question NUL answer); third reads are
ignored here, the first reader's label counts); answers that two
checkpoints gave word for word share one label. Reports, per checkpoint: answers read, the
share readers call misaligned (95% Wilson interval), the judge's share on the same answers, each
direction's mean answer activation; across checkpoints, Spearman's rho between each direction's
activation and the read rate (and the judged rate), and where the track measured random controls
(`steerkit track --control random:K`) where that rho falls among the controls' (their central
95% and the share of controls at least as extreme); per answer, the ROC AUC of each direction's
activation for read-misaligned vs the rest; per run, the first step at which each direction's
activation and the read rate have moved from step 0 (the rule of `steerkit track`); the judge's
and the second readers' Cohen's kappa. ``--plot`` draws `steerkit track`'s figure with the read
rates in place of the judged ones.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

# bench/ is on sys.path when this runs as a script
from sweep_read import item_id, write_batches

from steerkit.report import plot_track_png
from steerkit.stats import control_band, kappa as cohen_kappa, roc_auc, spearman, wilson
from steerkit.track_stats import LEAD_SE


def kappa(a: list[bool], b: list[bool]) -> float | None:
    """Cohen's kappa (steerkit.stats.kappa); None with nothing to compare."""
    return cohen_kappa(a, b) if a else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("track", type=Path, help="the --out folder of steerkit track")
    ap.add_argument("labels", type=Path, help="blind labels, JSON Lines")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--unread", type=Path, default=None,
                    help="write the distinct answers the labels lack here as blind batches (bNN.jsonl: item, question, answer; "
                         "shuffled, about --size each) for readers, and stop")
    ap.add_argument("--size", type=int, default=100)
    a = ap.parse_args()

    answers = [json.loads(x) for x in (a.track / "answers.jsonl").read_text().splitlines() if x.strip()]
    first: dict[str, dict] = {}
    second: dict[str, dict] = {}
    for x in a.labels.read_text().splitlines():
        if x.strip():
            r = json.loads(x)
            if not r.get("third"):  # third reads settle the reference set's disagreements (reference_labels.py add-track)
                (second if r.get("second") else first)[r["item"]] = r
    if a.unread is not None:
        todo = {}
        for r in answers:
            i = item_id(r["question"], r["completion"])
            if i not in first:
                todo[i] = {"item": i, "question": r["question"], "answer": r["completion"]}
        rows, n = write_batches(todo.values(), a.unread, a.size, random.Random(0))
        print(f"{len(rows)} distinct answers not read yet ({len(answers)} answers), in {n} batches in {a.unread}")
        return
    config = json.loads((a.track / "track.json").read_text())
    by_dir = (config.get("controls") or {}).get("by_direction") or {}
    controls = sorted({c for cs in by_dir.values() for c in cs})
    dirs = [d["name"] for d in config.get("directions", [])]
    measured = dirs + controls
    points: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in answers:
        points[(Path(r["run"]).name, int(r["step"]))].append(r)

    rows = []
    per_answer = []  # (read misaligned, activations)
    for (run, step), recs in points.items():
        read = [first[i]["label"] for i in (item_id(r["question"], r["completion"]) for r in recs) if i in first]
        mis = sum(lab == "misaligned" for lab in read)
        inc = sum(lab == "incoherent" for lab in read)
        _, lo, hi = wilson(mis, len(read)) if read else (0.0, 0.0, 0.0)
        judged = sum(bool(r.get("misaligned")) for r in recs)
        row = {
            "run": run, "step": step, "fraction": recs[0].get("fraction"), "answers": len(recs), "read": len(read),
            "read_misaligned": mis, "read_rate": mis / len(read) if read else None, "read_low": lo, "read_high": hi,
            "read_incoherent": inc, "judged_rate": judged / len(recs),
            "activation": {d: sum(r["activation"][d]["answer_mean"] for r in recs) / len(recs) for d in measured},
        }
        rows.append(row)
        for r in recs:
            i = item_id(r["question"], r["completion"])
            if i in first:
                per_answer.append((first[i]["label"] == "misaligned", {d: r["activation"][d]["answer_mean"] for d in dirs}, bool(r.get("misaligned"))))
    rows.sort(key=lambda r: (r["run"], r["step"]))
    pts = [r for r in rows if r["read"]]
    rho = {d: {"read": spearman([r["activation"][d] for r in pts], [r["read_rate"] for r in pts]),
               "judged": spearman([r["activation"][d] for r in pts], [r["judged_rate"] for r in pts])} for d in measured}
    band = {}  # each direction's rho among the random controls' of its layer (steerkit track --control random:K)
    for d in dirs:
        cs = by_dir.get(d) or []
        if cs:
            band[d] = {}
            for kind in ("read", "judged"):
                lo, hi, p = control_band(rho[d][kind], [rho[c][kind] for c in cs])
                band[d][kind] = {"controls": len(cs), "low": lo, "high": hi, "p": p}
    auc = {d: roc_auc([x[1][d] for x in per_answer], [int(x[0]) for x in per_answer]) for d in dirs}
    # leads, per run with a step 0: activation beyond LEAD_SE standard errors of the difference
    # from step 0 (as steerkit track) vs the read rate's Wilson interval clearing step 0's
    summaries = {(Path(p["run"]).name, int(p["step"])): p for p in
                 (json.loads(x) for x in (a.track / "points.jsonl").read_text().splitlines() if x.strip()) if not p.get("summary")}
    leads = []
    for run in sorted({r["run"] for r in rows}):
        ps = sorted((r for r in rows if r["run"] == run and r["read"]), key=lambda r: r["step"])
        if not ps or ps[0]["step"] != 0 or len(ps) < 2:
            continue
        moved_rate = next((r["step"] for r in ps[1:] if r["read_low"] > ps[0]["read_high"] or r["read_high"] < ps[0]["read_low"]), None)
        for d in dirs:
            a0 = summaries[(run, 0)]["activation"][d]
            def moved(r: dict) -> bool:
                a = summaries[(run, r["step"])]["activation"][d]
                return abs(a["answer_mean"] - a0["answer_mean"]) > LEAD_SE * (a["answer_se"] ** 2 + a0["answer_se"] ** 2) ** 0.5
            moved_act = next((r["step"] for r in ps[1:] if moved(r)), None)
            leads.append({"run": run, "direction": d, "activation_step": moved_act, "read_rate_step": moved_rate})
    if a.plot:
        pts = []
        for r in rows:
            p = dict(summaries[(r["run"], r["step"])])
            p.update(run=r["run"], judged=r["read"], rate=r["read_rate"], low=r["read_low"], high=r["read_high"])
            pts.append(p)
        order = {Path(p["run"]).name: i for i, p in enumerate(summaries.values())}
        pts.sort(key=lambda p: (order.get(p["run"], 0), p["step"]))
        plot_track_png(pts, a.plot, dirs, title="misalignment by blind reading (64 answers a point) and mean answer activation", rate_label="misaligned (read)")
    both = [i for i in second if i in first]
    out = {
        "answers": len(answers), "distinct_read": len(first), "points": rows,
        "spearman_activation_vs_rate": {d: rho[d] for d in dirs},
        "spearman_controls": {"by_direction": by_dir, "band": band, "rho": {c: rho[c] for c in controls}},
        "answer_auc_read_misaligned": auc,
        "leads": leads,
        "judge_vs_read_kappa": kappa([x[0] for x in per_answer], [x[2] for x in per_answer]),
        "readers_kappa": {"n": len(both), "misaligned": kappa([first[i]["label"] == "misaligned" for i in both], [second[i]["label"] == "misaligned" for i in both]),
                           "raw_agreement": (sum(first[i]["label"] == second[i]["label"] for i in both) / len(both)) if both else None},
    }
    text = json.dumps(out, indent=1)
    if a.out:
        a.out.write_text(text + "\n")
    print(f"{'run':<11} {'step':>4} {'frac':>5} {'read':>4} {'misaligned (read)':>20} {'judged':>6} " + " ".join(f"{d:>14}" for d in dirs))
    for r in rows:
        rr = f"{r['read_misaligned']}/{r['read']} {100 * (r['read_rate'] or 0):3.0f}% [{100 * r['read_low']:.0f}-{100 * r['read_high']:.0f}]"
        frac = "" if r["fraction"] is None else f"{r['fraction']:.2f}"
        print(f"{r['run']:<11} {r['step']:>4} {frac:>5} {r['read']:>4} {rr:>20} {100 * r['judged_rate']:5.0f}% " + " ".join(f"{r['activation'][d]:14.3f}" for d in dirs))
    print("Spearman rho (activation vs read rate / judged rate):", {d: (round(rho[d]["read"], 2), round(rho[d]["judged"], 2)) for d in dirs})
    for d, b in band.items():
        print(f"  {d} among {b['read']['controls']} random controls of its layer: read rho 95% band [{b['read']['low']:+.2f}, {b['read']['high']:+.2f}], "
              f"p {b['read']['p']:.3f}; judged [{b['judged']['low']:+.2f}, {b['judged']['high']:+.2f}], p {b['judged']['p']:.3f}")
    print("per-answer ROC AUC (read misaligned vs rest):", {d: round(v, 3) for d, v in auc.items()})
    for x in leads:
        print(f"{x['run']}: {x['direction']} moved at step {x['activation_step']}, read rate at step {x['read_rate_step']}")
    print("judge vs read kappa:", out["judge_vs_read_kappa"], " readers' kappa:", out["readers_kappa"])


if __name__ == "__main__":
    main()
