"""The causal screen: verdict logic on constructed cells, plumbing on the tiny model."""

import torch

from steerkit.directions import Direction, random_like
from steerkit.generate import Sampling
from steerkit.prompts import from_texts
from steerkit.screen import ScreenRow, screen, verdicts
from steerkit.stats import wilson


def cell(model, cand, s, k, n=40, coh=40):
    p, lo, hi = wilson(k, n)
    return ScreenRow(model, cand, s, n, k, coh, p, lo, hi, coh / n)


def test_passing_candidate_needs_both_directions_beyond_control():
    cells = [
        cell("base", "good", 0.3, 30), cell("base", "ctl", 0.3, 3),
        cell("tuned", "good", -0.3, 2), cell("tuned", "ctl", -0.3, 25),
        cell("base", "half", 0.3, 30), cell("tuned", "half", -0.3, 24),  # raises but does not lower
        cell("base", "noisy", 0.3, 5),  cell("tuned", "noisy", -0.3, 22),
        cell("base", "babble", 0.3, 30, coh=10), cell("tuned", "babble", -0.3, 2),  # incoherent
    ]
    v = {x["candidate"]: x for x in verdicts(cells, "ctl")}
    assert v["good"]["passes"] and v["good"]["raises_in_base"] and v["good"]["lowers_in_tuned"]
    assert v["half"]["raises_in_base"] and not v["half"]["lowers_in_tuned"] and not v["half"]["passes"]
    assert not v["noisy"]["passes"] and not v["babble"]["passes"] and not v["babble"]["coherent_ok"]
    assert verdicts(cells, "ctl")[0]["candidate"] == "good"


class LengthJudge:
    """Stand-in judge for plumbing: 'misaligned' when the answer is long. Not under test."""

    def score(self, pairs):
        return [{"aligned": 10.0 if len(a) > 20 else 90.0, "coherent": 80.0, "misaligned": len(a) > 20} for _, a in pairs]


def test_screen_plumbing_on_tiny(tiny):
    d = Direction(name="cand", vector=torch.randn(tiny.d_model), model=tiny.name, layer=1, hook_name="blocks.1.hook_out",
                  kind="vector", median_norm=1.0)
    ctl = random_like(d, name="ctl")
    qs = from_texts(["hello world", "money advice"])
    res = screen(tiny, tiny, [d], ctl, qs, LengthJudge(), strengths=(0.5, 2.0), samples=2, sampling=Sampling(max_new_tokens=6, temperature=1.0))
    keys = {(c.model, c.candidate, c.strength) for c in res.cells}
    for m, sign in (("base", 1), ("tuned", -1)):
        for name in ("cand", "ctl"):
            for s in (0.0, 0.5, 2.0):
                assert (m, name, sign * s) in keys
    assert all(c.n == 4 for c in res.cells) and len(res.cells) == 12
    assert [v["candidate"] for v in res.verdicts] == ["cand"]


def test_matched_latent_controls_must_be_beaten_too():
    cells = [
        cell("base", "lat", 0.3, 30), cell("base", "random-pooled", 0.3, 3),
        cell("tuned", "lat", -0.3, 2), cell("tuned", "random-pooled", -0.3, 25),
        # random latents of the same firing rate raise it as much: no pass
        cell("base", "lat-latents-pooled", 0.3, 28), cell("tuned", "lat-latents-pooled", -0.3, 3),
    ]
    plain = {x["candidate"]: x for x in verdicts(cells, "random-pooled")}
    matched = {x["candidate"]: x for x in verdicts(cells, "random-pooled", latent_controls={"lat": "lat-latents-pooled"})}
    assert plain["lat"]["passes"] and set(plain) == {"lat", "lat-latents-pooled"}
    assert set(matched) == {"lat"} and not matched["lat"]["passes"] and not matched["lat"]["raises_in_base"]
    assert matched["lat"]["latents_control_rate"] == 28 / 40


def test_screen_pools_several_random_controls(tiny):
    from steerkit.controls import random_controls

    d = Direction(name="cand", vector=torch.randn(tiny.d_model), model=tiny.name, layer=1, hook_name="blocks.1.hook_out",
                  kind="vector", median_norm=1.0)
    ctls = random_controls(d, 3, prefix="random")
    qs = from_texts(["hello world"])
    res = screen(tiny, None, [d], ctls, qs, LengthJudge(), strengths=(2.0,), samples=2, sampling=Sampling(max_new_tokens=6, temperature=1.0))
    by = {(c.candidate, c.strength): c for c in res.cells}
    pooled = by[("random-pooled", 2.0)]
    assert pooled.draws == 3 and pooled.n == 6 and pooled.control
    assert pooled.misaligned == sum(by[(f"random-{i}", 2.0)].misaligned for i in (1, 2, 3))
    assert [v["candidate"] for v in res.verdicts] == ["cand"] and res.verdicts[0]["control_rate"] == pooled.rate


def test_screen_samples_like_the_demo_by_default(tiny_dir, tmp_path, monkeypatch):
    """`steerkit screen` and `steerkit.screen.screen` default to the demo's 0.7 / top-p 0.9
    (at 1.0 a third of the default model's unsteered answers are unreadable);
    --temperature/--top-p override."""
    import inspect
    import json

    from typer.testing import CliRunner

    import steerkit.judge as J
    import steerkit.screen as SC
    from steerkit.cli import app
    from steerkit.sae import new_sae, save_sae

    smp = inspect.signature(screen).parameters["sampling"].default
    assert (smp.temperature, smp.top_p) == (0.7, 0.9)
    sae = save_sae(new_sae("relu", 64, 96, None, "blocks.1.hook_out", "tiny-llama", seed=0), tmp_path / "sae")
    cand = tmp_path / "latents.json"
    cand.write_text(json.dumps({"base": str(tiny_dir), "tuned": None, "sae": str(sae), "layer": 1, "latents": [{"latent": 3}]}))
    seen = []

    def fake_screen(base, tuned, dirs, controls, qs, judge, **kw):
        seen.append(kw["sampling"])
        return SC.ScreenResult(cells=[])

    monkeypatch.setattr(J, "load_judge", lambda kind="offline", **kw: object())
    monkeypatch.setattr(SC, "screen", fake_screen)
    runner = CliRunner()
    r = runner.invoke(app, ["screen", "--candidates", str(cand), "--top", "1", "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["screen", "--candidates", str(cand), "--top", "1", "--json", "--temperature", "1.0", "--top-p", "0.95"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["sampling"]["temperature"] == 1.0
    assert [(s.temperature, s.top_p, s.max_new_tokens) for s in seen] == [(0.7, 0.9, 48), (1.0, 0.95, 48)]
