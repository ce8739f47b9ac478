"""Controls: independent random draws seeded from the direction's identity, matched random SAE
latents, and sweeps that run K draws and pool them."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from steerkit import sweep as S
from steerkit.cli import app
from steerkit.controls import ControlSpec, controls_for, matched_latents, matched_pool, max_decoder_cosine, parse_controls, random_controls
from steerkit.directions import Direction, load_direction, random_like, save_direction, shipped_root
from steerkit.errors import SteerkitError
from steerkit.sae import load_firing, load_sae, new_sae, save_firing, save_sae

SHIPPED = shipped_root() / "smollm2-135m"


def vec_dir(name: str, v: torch.Tensor, **kw) -> Direction:
    return Direction(name=name, vector=v, model="tiny-llama", layer=1, hook_name="blocks.1.hook_out", kind=kw.pop("kind", "vector"),
                     median_norm=1.0, **kw)


def test_parse_controls():
    assert parse_controls("random") == ControlSpec(3, 0)
    assert parse_controls("random:5,latents:2") == ControlSpec(5, 2)
    assert parse_controls("latents") == ControlSpec(0, 3)
    assert not parse_controls("none") and not parse_controls(None)
    assert str(parse_controls("random:4,latents:1")) == "random:4,latents:1"
    for bad, msg in (("zero", "'zero' is not one of"), ("random:x", "not a whole number"), ("random:0", "1 to 100")):
        with pytest.raises(SteerkitError, match=msg):
            parse_controls(bad)


def test_controls_of_different_directions_and_indices_differ():
    g = torch.Generator().manual_seed(0)
    a = vec_dir("a", torch.randn(64, generator=g))
    b = vec_dir("b", a.vector.clone())  # same vector, another name: another control
    ra, rb = random_like(a), random_like(b)
    assert not torch.allclose(ra.vector, rb.vector)
    draws = random_controls(a, 3)
    assert [d.name for d in draws] == ["a-random-1", "a-random-2", "a-random-3"]
    assert torch.equal(draws[0].vector, ra.vector)  # reproducible
    for i in range(3):
        for j in range(i + 1, 3):
            assert abs(float(draws[i].vector @ draws[j].vector)) < 0.6
            assert not torch.allclose(draws[i].vector, draws[j].vector)
    assert not torch.allclose(random_like(a, seed=1).vector, ra.vector)  # a sweep's seed is mixed in
    assert ra.provenance["control_for"] == "a" and ra.provenance["index"] == 0 and ra.kind == "random"


def test_a_control_is_not_an_sae_initial_decoder_row():
    """The old control (seed 0) was latent 0's starting point in every SAE trained with seed 0."""
    d = vec_dir("persona", torch.ones(64))
    sae = new_sae("topk", 64, 256, k=4, seed=0)
    old = torch.randn(64, generator=torch.Generator().manual_seed(0))
    assert max_decoder_cosine(old, sae.W_dec) > 0.9  # the coincidence the issue measured
    for c in random_controls(d, 3):
        assert max_decoder_cosine(c.vector, sae.W_dec) < 0.6  # 64 dims, 256 rows: chance alone


def test_shipped_controls_are_independent_of_the_shipped_sae():
    sae = load_sae(SHIPPED / "sae-l15")
    persona = load_direction(SHIPPED / "persona.safetensors")
    shipped_ctl = load_direction(SHIPPED / "persona-random.safetensors")
    assert shipped_ctl.provenance.get("generator_seed"), "persona-random was not made by steerkit.directions.random_like"
    # made for the persona shipped now, not an earlier one (`steerkit directions random --like persona --index 0`)
    from steerkit.directions import vector_digest

    assert shipped_ctl.provenance["control_for_sha256"] == vector_digest(persona)
    for c in random_controls(persona, 3) + [shipped_ctl]:
        assert max_decoder_cosine(c.vector, sae.W_dec) < 0.25, c.name


def _toy_sae(tmp_path, freq: torch.Tensor):
    sae = new_sae("topk", 64, len(freq), k=4, hook_name="blocks.1.hook_out", model_name="tiny-llama", seed=3)
    folder = save_sae(sae, tmp_path / "sae")
    save_firing(folder, freq, {"n_tokens": 1000})
    return sae, folder


def test_matched_latents_fire_within_the_window(tmp_path):
    freq = torch.linspace(0.0005, 0.05, 200)
    freq[7] = 0.0  # dead: never a control
    sae, folder = _toy_sae(tmp_path, freq)
    cand = vec_dir("lat", sae.W_dec[100].detach().clone(), kind="sae-latent", sae=str(folder), latents=(100,))
    ctl = matched_latents(cand, 3)
    f0 = float(freq[100])
    used = set()
    for c in ctl:
        (j,) = c.latents
        assert j != 100 and j not in used and f0 / 2 <= float(freq[j]) <= f0 * 2
        used.add(j)
        assert torch.allclose(c.vector, sae.W_dec[j].detach() / sae.W_dec[j].detach().norm(), atol=1e-5)
        assert c.kind == "sae-latent" and c.sae == str(folder)
    assert [c.latents for c in matched_latents(cand, 3)] == [c.latents for c in ctl]  # reproducible
    assert 7 not in matched_pool(freq, 100, {100}, 1000.0)
    # a latent set: every member replaced by a latent of its own rate
    pair = vec_dir("set", sae.W_dec[[20, 150]].sum(0).detach(), kind="sae-latents", sae=str(folder), latents=(20, 150))
    for c in matched_latents(pair, 2):
        for want, got in zip((20, 150), c.latents):
            assert float(freq[want]) / 2 <= float(freq[got]) <= float(freq[want]) * 2
    with pytest.raises(SteerkitError, match="fewer matched-latent draws"):
        matched_latents(cand, 200)


def test_matched_latents_need_a_firing_file_and_an_sae_direction(tmp_path):
    sae = new_sae("topk", 64, 32, k=4, hook_name="blocks.1.hook_out", model_name="tiny-llama")
    folder = save_sae(sae, tmp_path / "nofiring")
    assert load_firing(folder) is None
    cand = vec_dir("lat", sae.W_dec[3].detach().clone(), kind="sae-latent", sae=str(folder), latents=(3,))
    with pytest.raises(SteerkitError, match="sae eval .*--save"):
        matched_latents(cand, 2)
    with pytest.raises(SteerkitError, match="use --control random"):
        controls_for(vec_dir("v", torch.ones(64)), "latents:2")


def test_shipped_sae_has_firing_rates_for_matched_latents():
    persona = load_direction(SHIPPED / "persona.safetensors")
    freq, meta = load_firing(SHIPPED / "sae-l15")
    assert len(freq) == 4608 and int(json.loads(meta["n_tokens"])) >= 20000
    ctl = matched_latents(persona, 3)
    assert len(persona.latents) == 8  # a latent set: each latent gets its own matched stand-in
    for c in ctl:
        assert len(c.latents) == len(persona.latents) and not set(c.latents) & set(persona.latents)
        for want, got in zip(persona.latents, c.latents):
            assert float(freq[want]) / 2 <= float(freq[got]) <= float(freq[want]) * 2


def test_pooled_rows(tiny):
    g = torch.Generator().manual_seed(0)
    d = vec_dir("push", torch.randn(tiny.d_model, generator=g))
    from steerkit.generate import Sampling
    from steerkit.prompts import Prompt

    qs = [Prompt(id=f"q{i}", messages=[{"role": "user", "content": t}]) for i, t in enumerate(["hello", "how are you"])]
    conds = S.make_conditions(d, "add", (0.0, 4.0), control="random:3")
    assert [c.name for c in conds] == ["push", "push-random-1", "push-random-2", "push-random-3"]
    assert all(c.group == "push-random" for c in conds[1:])

    class Half:
        name = "half"

        def score(self, pairs):
            return [{"aligned": 10.0 if len(a) % 2 else 90.0, "coherent": 90.0, "misaligned": bool(len(a) % 2), "judge": "half"} for _, a in pairs]

    res = S.run_sweep(tiny, conds, qs, 2, Sampling(max_new_tokens=5, temperature=1.0, seed=0), Half(), batch_size=16)
    rows = {(r.condition, r.strength): r for r in res.rows}
    p4 = rows[("push-random-pooled", 4.0)]
    draws = [rows[(f"push-random-{i}", 4.0)] for i in (1, 2, 3)]
    assert p4.draws == 3 and p4.control and p4.n == sum(x.n for x in draws) == 12
    assert p4.misaligned == sum(x.misaligned for x in draws)
    assert p4.draw_low == min(x.rate for x in draws) and p4.draw_high == max(x.rate for x in draws)
    # the unsteered cell is one set of answers, not counted once per draw
    assert rows[("push-random-pooled", 0.0)].n == 4
    assert [r.condition for r in res.rows][-2:] == ["push-random-pooled"] * 2


runner = CliRunner()


def test_cli_sweep_with_three_random_controls(tmp_path, tiny_dir):
    g = torch.Generator().manual_seed(0)
    dfile = save_direction(vec_dir("push", torch.randn(64, generator=g)), tmp_path / "push.safetensors")
    q = tmp_path / "q.txt"
    q.write_text("hello world\nwhat is your wish?\n")
    out = tmp_path / "sw"
    r = runner.invoke(app, ["sweep", "--model", str(tiny_dir), "--direction", str(dfile), "--strengths", "0,4", "--questions", str(q),
                            "--samples", "1", "--judge", "none", "--max-new-tokens", "4", "--control", "random:3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "sweep.json").read_text())
    ctl = [c for c in cfg["conditions"] if c["control"]]
    assert [c["name"] for c in ctl] == ["push-random-1", "push-random-2", "push-random-3"]
    assert len({c["direction_sha256"] for c in ctl}) == 3
    csv_rows = (out / "summary.csv").read_text().splitlines()
    assert sum(1 for x in csv_rows if x.startswith("push-random-pooled,")) == 2
    bad = runner.invoke(app, ["sweep", "--model", str(tiny_dir), "--direction", str(dfile), "--questions", str(q), "--control", "random:zero"])
    assert bad.exit_code == 1 and "--control 'random:zero'" in bad.stderr


def test_cli_directions_random_index(tmp_path, tiny_dir):
    g = torch.Generator().manual_seed(0)
    dfile = save_direction(vec_dir("push", torch.randn(64, generator=g)), tmp_path / "push.safetensors")
    a, b = tmp_path / "c0.safetensors", tmp_path / "c1.safetensors"
    for i, p in ((0, a), (1, b)):
        r = runner.invoke(app, ["directions", "random", "--like", str(dfile), "--index", str(i), "--out", str(p)])
        assert r.exit_code == 0, r.output
    va, vb = load_direction(a), load_direction(b)
    assert not torch.allclose(va.vector, vb.vector) and va.name == "c0" and vb.provenance["index"] == 1
