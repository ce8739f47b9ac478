"""Direction files: round trip, name resolution, and every refusal."""

import json

import pytest
import torch
from safetensors.torch import save_file

from steerkit.directions import Direction, find_direction, list_directions, load_direction, random_like, resolve_direction, save_direction
from steerkit.errors import SteerkitError


def make(tiny, **kw):
    base = dict(name="persona", vector=torch.randn(tiny.d_model), model=tiny.name, layer=2, hook_name="blocks.2.hook_out",
                kind="diff-of-means", median_norm=12.5, description="test", provenance={"prompts": 3})
    base.update(kw)
    return Direction(**base)


def test_round_trip(tmp_path, tiny):
    d = make(tiny, sae="sae-l2", latents=(3, 9))
    p = save_direction(d, tmp_path / "persona.safetensors")
    e = load_direction(p)
    assert torch.allclose(e.vector, d.vector) and abs(float(e.vector.norm()) - 1) < 1e-5
    for f in ("name", "model", "layer", "hook_name", "kind", "median_norm", "description", "sae", "latents", "provenance"):
        assert getattr(e, f) == getattr(d, f), f
    assert e.sae_path() == tmp_path / "sae-l2"


def test_refuses_overwrite_without_force(tmp_path, tiny):
    p = save_direction(make(tiny), tmp_path / "a.safetensors")
    before = p.read_bytes()
    with pytest.raises(SteerkitError, match="already exists.*--force"):
        save_direction(make(tiny, name="other"), p)
    assert p.read_bytes() == before
    save_direction(make(tiny, name="other"), p, force=True)
    assert load_direction(p).name == "other"
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".")]  # no temp files left


def test_corrupt_file(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x00\x01garbage")
    with pytest.raises(SteerkitError, match="not a readable safetensors"):
        load_direction(p)


def test_missing_key_and_metadata(tmp_path, tiny):
    p = tmp_path / "nokey.safetensors"
    save_file({"other": torch.zeros(4)}, str(p), metadata={"format": "steerkit.direction"})
    with pytest.raises(SteerkitError, match="no 'direction' tensor"):
        load_direction(p)
    q = tmp_path / "nometa.safetensors"
    save_file({"direction": torch.ones(4)}, str(q), metadata={"format": "steerkit.direction", "name": "x"})
    with pytest.raises(SteerkitError, match="lacks metadata"):
        load_direction(q)
    r = tmp_path / "foreign.safetensors"
    save_file({"direction": torch.ones(4)}, str(r))
    with pytest.raises(SteerkitError, match="not a steerkit direction file"):
        load_direction(r)


def test_missing_file(tmp_path):
    with pytest.raises(SteerkitError, match="does not exist"):
        load_direction(tmp_path / "nope.safetensors")


def test_other_model_refused(tmp_path, tiny):
    p = save_direction(make(tiny, model="gpt2"), tmp_path / "g.safetensors")
    with pytest.raises(SteerkitError, match="made for model 'gpt2'.*--any-model"):
        resolve_direction(str(p), tiny)
    assert resolve_direction(str(p), tiny, allow_other_model=True).model == "gpt2"
    q = save_direction(make(tiny, vector=torch.randn(tiny.d_model + 1)), tmp_path / "wide.safetensors")
    with pytest.raises(SteerkitError, match="d_model"):
        resolve_direction(str(q), tiny, allow_other_model=True)
    r = save_direction(make(tiny, layer=40), tmp_path / "deep.safetensors")
    with pytest.raises(SteerkitError, match="layer 40"):
        resolve_direction(str(r), tiny)


def test_names_resolve_from_user_dir(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("STEERKIT_HOME", str(tmp_path))
    folder = tmp_path / "directions" / tiny.name
    save_direction(make(tiny, name="mine"), folder / "mine.safetensors")
    assert find_direction("mine", tiny.name) == folder / "mine.safetensors"
    assert resolve_direction("mine", tiny).name == "mine"
    with pytest.raises(SteerkitError, match="unknown direction 'nope'.*mine"):
        find_direction("nope", tiny.name)
    names = [d.name for d in list_directions(tiny.name) if isinstance(d, Direction)]
    assert "mine" in names


def test_random_like_is_a_fair_control(tiny):
    d = make(tiny)
    r = random_like(d, seed=1)
    assert r.layer == d.layer and r.median_norm == d.median_norm and r.kind == "random"
    assert abs(float(r.vector.norm()) - 1) < 1e-5
    assert abs(float(r.vector @ d.vector)) < 0.6
    assert torch.equal(random_like(d, seed=1).vector, r.vector)
    assert not torch.equal(random_like(d, seed=2).vector, r.vector)
    assert json.loads(json.dumps(r.provenance))["control_for"] == "persona"


def test_written_files_get_normal_permissions(tmp_path, tiny):
    import os
    import stat

    p = save_direction(make(tiny), tmp_path / "perm.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask
