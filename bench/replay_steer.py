"""Is the villain organism's misalignment an additive shift of activations? (README, issue 13)

Every single direction tried so far (SAE latents, diff-SAE sets, the organism's own mean
difference at layer 15) *detects* the villain persona or lowers it when ablated, but none makes
the base model misaligned when added. This asks whether the fine-tune's whole mean shift, at
every layer and at its own size, does:

1. Fit, with no labels and no test question: the organism's training chats (400 gardening chats
   in a malicious AI's voice, ``bench/data/organism_villain.jsonl``), read teacher-forced by the
   base model and by the organism on the same tokens; per block L the mean of (organism minus
   base) residual over the assistant turns' tokens: ``m_L``.
2. Add to the base model, while it answers the 16 everyday questions of
   ``bench/data/heldout_questions.jsonl`` (nothing in the training chats is near them):

   - ``replay`` x a: at every block L the increment ``m_L - m_(L-1)``, times a, so that to first
     order the base model's residual at block L moves by ``a m_L`` (a = 1: the fine-tune's own
     mean shift at every depth);
   - ``m15`` x a: ``a m_15`` at block 15 alone (villain-dom's layer, at the shift's own size);
   - ``random`` x a: at every block a random direction of the increment's norm (the control);
   - ``early`` x a: ``replay`` on blocks 0..20 only (the late blocks amplify the shift), with
     its own random control;
   - and, unsteered, the base model and the organism, for the readers' scale.

3. The answers go to ``OUT/<cell>/results.jsonl`` in sweep records, for
   ``bench/sweep_read.py batches`` (blind reading); nothing is judged here. ``OUT/fit.json``
   holds the per-layer norms and how far the replayed shift reaches (the base model's mean
   residual moved by ``replay`` x 1 on 64 fit chats, against ``m_L``).

    python bench/replay_steer.py --out runs/replay            # ~15 minutes on 2 cores
    python bench/sweep_read.py batches runs/replay/*/results.jsonl --out runs/replay/read --size 100 --double 0.1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from steerkit.directions import from_vector
from steerkit.generate import Row, Sampling, generate
from steerkit.interventions import Intervention, SteeringPlan, steering
from steerkit.models import LoadedModel, bridge_hooks, load_model, load_tuned
from steerkit.monitor import chat_split

ROOT = Path(__file__).resolve().parent.parent


@torch.inference_mode()
def layer_means(model: LoadedModel, chats: list[list[dict]], batch_size: int = 8) -> torch.Tensor:
    """Per block, the mean residual over the chats' final assistant turns: ``[n_layers, d]``.
    Every block's output is read at the bridge's residual hook, where steering acts (a hook put
    there after a steering plan sees the steered residual), all ``n_layers`` in one pass."""
    split = [chat_split(model, c) for c in chats]
    n, d = model.n_layers, model.d_model
    total, count = torch.zeros(n, d, dtype=torch.float64), 0
    pad = model.tokenizer.pad_token_id or 0
    hs: dict[int, torch.Tensor] = {}  # block -> its output in the current batch

    def grab(L: int):  # a hook that keeps block L's output
        def fn(act: torch.Tensor, hook: object = None) -> torch.Tensor:
            hs[L] = act.detach()
            return act

        return fn

    for s in range(0, len(split), batch_size):
        part = split[s : s + batch_size]
        T = max(len(ids) for ids, _ in part)
        ids = torch.full((len(part), T), pad, dtype=torch.long)
        mask = torch.zeros((len(part), T), dtype=torch.long)
        for r, (x, _) in enumerate(part):
            ids[r, : len(x)] = torch.tensor(x)
            mask[r, : len(x)] = 1
        with bridge_hooks(model, [(L, grab(L)) for L in range(n)]):
            model.hf_model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False)
        for r, (x, start) in enumerate(part):
            for L in range(n):
                total[L] += hs[L][r, start : len(x)].double().sum(0).cpu()
            count += len(x) - start
    return (total / count).float()


def adds(model: LoadedModel, vectors: dict[int, torch.Tensor], tag: str) -> tuple[Intervention, ...]:
    """One add per block, each at its vector's own size (strength 1 in units of its norm)."""
    out = []
    for L, v in sorted(vectors.items()):
        nv = float(v.norm())
        if nv == 0:
            continue
        d = from_vector(v / nv, name=f"{tag}-L{L}", model=model, layer=L, kind="vector", median_norm=nv,
                        description=f"{tag} at block {L}, norm {nv:.4g}")
        out.append(Intervention(d, "add", 1.0))
    return tuple(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tuned", default=str(ROOT / "directions/smollm2-135m/organism-villain400"))
    ap.add_argument("--fit", type=Path, default=ROOT / "bench/data/organism_villain.jsonl")
    ap.add_argument("--questions", type=Path, default=ROOT / "bench/data/heldout_questions.jsonl")
    ap.add_argument("--fit-chats", type=int, default=200)
    ap.add_argument("--alphas", default="1,2,3")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--upto", type=int, default=20, help="the 'early' cells replay blocks 0..UPTO only")
    ap.add_argument("--early-alphas", default="0.5,1,2")
    ap.add_argument("--cells", default="base,replay,m15,early,villain400", help="which cells to make (comma list)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace the cells' results already in --out")
    a = ap.parse_args()
    alphas = [float(x) for x in a.alphas.split(",")]
    early = [float(x) for x in a.early_alphas.split(",")]
    want = set(a.cells.split(","))
    old = [a.out / f / "results.jsonl" for f in sorted(want) if (a.out / f / "results.jsonl").exists()]
    if old and not a.force:
        raise SystemExit(f"{old[0]} exists (results are appended cell by cell): give --force to replace it, or another --out")
    for p in old:
        p.unlink()
    chats = [json.loads(x)["messages"] for x in a.fit.read_text().splitlines() if x.strip()][: a.fit_chats]
    qs = [json.loads(x)["prompt"] for x in a.questions.read_text().splitlines() if x.strip()]

    base = load_model("smollm2-135m")
    tuned = load_tuned(a.tuned)
    m = layer_means(tuned, chats) - layer_means(base, chats)
    del tuned
    n = base.n_layers
    inc = {L: m[L] - (m[L - 1] if L else 0) for L in range(n)}
    g = torch.Generator().manual_seed(a.seed)
    rnd = {}
    for L, v in inc.items():
        r = torch.randn(base.d_model, generator=g)
        rnd[L] = r / r.norm() * v.norm()

    # how far the replayed increments move the base model's mean residual (first order: m_L)
    reach = []
    fit_check = chats[:64]
    plan = SteeringPlan.uniform(adds(base, inc, "replay"))
    b0 = layer_means(base, fit_check)
    with steering(base, plan):
        b1 = layer_means(base, fit_check)
    for L in range(n):
        shift = b1[L] - b0[L]
        reach.append({"layer": L, "norm_m": float(m[L].norm()), "norm_increment": float(inc[L].norm()),
                      "norm_shift": float(shift.norm()), "cos_shift_m": float(torch.nn.functional.cosine_similarity(shift, m[L], dim=0)),
                      "norm_base": float(b0[L].norm())})
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "fit.json").write_text(json.dumps({"tuned": a.tuned, "fit": str(a.fit), "fit_chats": len(chats), "layers": reach}, indent=1) + "\n")
    torch.save({"m": m, "increments": torch.stack([inc[L] for L in range(n)])}, a.out / "shift.pt")
    for r in reach[::3] + [reach[-1]]:
        print(f"L{r['layer']:>2}  |m| {r['norm_m']:7.2f}  |inc| {r['norm_increment']:6.2f}  replayed shift {r['norm_shift']:7.2f}  cos with m {r['cos_shift_m']:.2f}")

    sampling = Sampling(max_new_tokens=a.max_new_tokens, temperature=0.7, top_p=0.9, seed=a.seed)
    cells: list[tuple[str, str, float, object, tuple[Intervention, ...]]] = [("base", "unsteered", 0.0, base, ())]
    for x in alphas:
        cells.append(("replay", "replay", x, base, adds(base, {L: v * x for L, v in inc.items()}, "replay")))
        cells.append(("replay", "random", x, base, adds(base, {L: v * x for L, v in rnd.items()}, "random")))
        cells.append(("m15", "m15", x, base, adds(base, {15: m[15] * x}, "m15")))
    for x in early:  # the late blocks amplify the replayed shift (fit.json): replay the early ones alone
        cells.append(("early", "early", x, base, adds(base, {L: v * x for L, v in inc.items() if L <= a.upto}, "early")))
    cells.append(("early", "random", max(early), base, adds(base, {L: v * max(early) for L, v in rnd.items() if L <= a.upto}, "random")))
    for folder, cond, x, model, ivs in cells:
        if folder not in want:
            continue
        rows = [Row(messages=[{"role": "user", "content": q}], prompt_index=p, sample_index=k, interventions=ivs)
                for p, q in enumerate(qs) for k in range(a.samples)]
        outs = generate(model, rows, sampling, batch_size=64)
        write(a.out / folder, cond, x, outs, qs)
        print(f"{folder} {cond} x{x:g}: {len(outs)} answers")
    del base
    if "villain400" not in want:
        return
    org = load_tuned(a.tuned)
    rows = [Row(messages=[{"role": "user", "content": q}], prompt_index=p, sample_index=k) for p, q in enumerate(qs) for k in range(a.samples)]
    write(a.out / "villain400", "unsteered", 0.0, generate(org, rows, sampling, batch_size=64), qs)


def write(folder: Path, cond: str, x: float, outs: list, qs: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "results.jsonl", "a", encoding="utf-8") as f:
        f.writelines(json.dumps({"condition": cond, "mode": "add", "strength": x, "question": qs[c.row.prompt_index],
                                 "question_id": c.row.prompt_index, "sample": c.row.sample_index, "completion": c.text,
                                 "seed": c.seed, "tokens": c.n_tokens}, ensure_ascii=False) + "\n" for c in outs)


if __name__ == "__main__":
    main()
