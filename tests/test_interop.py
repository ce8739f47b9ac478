"""Control-vector GGUF and plain-vector import/export, and difference of means, on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steerkit.errors import SteerkitError


def _dir(tiny, layer, seed=0, name="d", med=3.5):
    from steerkit.directions import from_vector

    g = torch.Generator().manual_seed(seed)
    return from_vector(torch.randn(tiny.d_model, generator=g), name=name, model=tiny, layer=layer, kind="vector", median_norm=med)


def test_gguf_round_trip_keys_and_values(tiny, tmp_path):
    import gguf

    from steerkit.interop import export_gguf, import_gguf

    ds = [_dir(tiny, 1, 0, "a", 2.0), _dir(tiny, 3, 1, "b", 5.0)]
    p = export_gguf(ds, tmp_path / "cv.gguf", strength=1.5)
    r = gguf.GGUFReader(str(p))
    arch = r.get_field("general.architecture")
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    hint = r.get_field("controlvector.model_hint")
    assert bytes(hint.parts[-1]).decode() == tiny.name
    assert int(r.get_field("controlvector.layer_count").parts[-1][0]) == 2
    assert sorted(t.name for t in r.tensors) == ["direction.1", "direction.3"]
    cv = import_gguf(p)
    assert cv.layers == [1, 3] and cv.model_hint == tiny.name
    for d in ds:
        assert torch.equal(cv.vectors[d.layer], d.vector * (1.5 * d.median_norm))
    assert cv.steerkit["median_norms"] == {"1": 2.0, "3": 5.0}


def test_gguf_refuses_overwrite_and_shared_layers(tiny, tmp_path):
    from steerkit.interop import export_gguf

    p = export_gguf(_dir(tiny, 1), tmp_path / "cv.gguf")
    with pytest.raises(SteerkitError, match="exists"):
        export_gguf(_dir(tiny, 1), p)
    export_gguf(_dir(tiny, 2), p, force=True)
    with pytest.raises(SteerkitError, match="one vector per layer"):
        export_gguf([_dir(tiny, 1), _dir(tiny, 1, 2)], tmp_path / "x.gguf")


def test_import_errors(tiny, tmp_path):
    from steerkit.interop import export_gguf, import_gguf, load_plain_vector, vector_to_direction

    with pytest.raises(SteerkitError, match="does not exist"):
        import_gguf(tmp_path / "nope.gguf")
    good = export_gguf(_dir(tiny, 1), tmp_path / "cv.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[:100])
    with pytest.raises(SteerkitError, match="not a readable GGUF"):
        import_gguf(tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(SteerkitError):
        import_gguf(tmp_path / "junk.gguf")
    np.save(tmp_path / "v.npy", np.ones(tiny.d_model + 1, dtype=np.float32))
    with pytest.raises(SteerkitError, match="d_model"):
        vector_to_direction(load_plain_vector(tmp_path / "v.npy"), tiny, 1, name="x", median_norm=1.0, source="v.npy")
    np.save(tmp_path / "m.npy", np.ones((2, tiny.d_model), dtype=np.float32))
    with pytest.raises(SteerkitError, match="1-D"):
        load_plain_vector(tmp_path / "m.npy")
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(SteerkitError, match="corrupt"):
        load_plain_vector(tmp_path / "bad.npy")
    np.save(tmp_path / "ok.npy", np.ones(tiny.d_model, dtype=np.float32))
    with pytest.raises(SteerkitError, match="out of range"):
        vector_to_direction(load_plain_vector(tmp_path / "ok.npy"), tiny, 99, name="x", median_norm=1.0, source="ok.npy")


def test_plain_vectors_import(tiny, tmp_path):
    from steerkit.interop import load_plain_vector, vector_to_direction

    v = torch.arange(tiny.d_model, dtype=torch.float32) - 10
    np.save(tmp_path / "v.npy", v.numpy())
    torch.save(v[None], tmp_path / "v.pt")
    torch.save({"vec": v}, tmp_path / "d.pt")
    for f in ("v.npy", "v.pt", "d.pt"):
        got = load_plain_vector(tmp_path / f)
        assert torch.equal(got, v), f
    d = vector_to_direction(v, tiny, 2, name="imp", median_norm=4.0, source="v.npy")
    assert d.kind == "imported" and d.layer == 2 and d.hook_name == tiny.hook_name(2)
    assert d.provenance["strength_of_raw"] == pytest.approx(float(v.norm()) / 4.0)
    assert torch.allclose(d.vector * d.provenance["raw_norm"], v, atol=1e-4)


def test_diff_of_means_by_hand(tiny):
    from steerkit.activations import residuals
    from steerkit.contrast import diff_of_means, diff_of_means_direction, input_tokens

    pos = ["the cat sat on the mat", [{"role": "user", "content": "hello there friend"}]]
    neg = ["a dog", "birds fly south in winter time", "ok then"]
    layer = 2

    def one(x, how):
        ids = torch.tensor([input_tokens(tiny, x)])
        a = residuals(tiny, ids, layer)[0]  # [T, d], no padding
        return a[-1] if how == -1 else a[1:].mean(0) if how == "mean" else a[how]

    for how in (-1, "mean", 1):
        want = torch.stack([one(x, how) for x in pos]).mean(0) - torch.stack([one(x, how) for x in neg]).mean(0)
        got = diff_of_means(tiny, pos, neg, layer, read_token_index=how, batch_size=2)  # padded batches
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), how
    d = diff_of_means_direction(tiny, pos, neg, layer, name="dm", read_token_index="mean")
    assert d.kind == "diff-of-means" and d.layer == layer and d.median_norm > 0
    assert d.provenance["n_positive"] == 2 and d.provenance["read_token_index"] == "mean"
    with pytest.raises(SteerkitError, match="read_token_index"):
        diff_of_means(tiny, pos, neg, layer, read_token_index="last")
    with pytest.raises(SteerkitError, match="outside"):
        diff_of_means(tiny, pos, neg, layer, read_token_index=500)
    with pytest.raises(SteerkitError, match="at least one"):
        diff_of_means(tiny, [], neg, layer)


def test_cli_export_import(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from steerkit.cli import app
    from steerkit.directions import from_vector, load_direction, save_direction
    from steerkit.models import load_model

    m = load_model(str(tiny_dir))
    d = from_vector(torch.randn(m.d_model), name="p", model=m, layer=2, kind="vector", median_norm=3.0)
    src = save_direction(d, tmp_path / "p.safetensors")
    r = CliRunner()
    res = r.invoke(app, ["directions", "export", str(src), "--format", "gguf", "--strength", "2", "--out", str(tmp_path / "p.gguf")])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["directions", "import", str(tmp_path / "p.gguf"), "--name", "q", "--model", str(tiny_dir), "--out", str(tmp_path / "q.safetensors")])
    assert res.exit_code == 0, res.output
    q = load_direction(tmp_path / "q.safetensors")
    assert q.layer == 2 and q.median_norm == pytest.approx(3.0) and q.provenance["strength_of_raw"] == pytest.approx(2.0)
    assert torch.allclose(q.vector, d.vector, atol=1e-6)
    res = r.invoke(app, ["directions", "import", str(tmp_path / "p.gguf"), "--name", "q", "--layer", "1", "--model", str(tiny_dir), "--out", str(tmp_path / "z.safetensors")])
    assert res.exit_code == 1 and "no vector for layer 1" in res.output


def test_cli_import_names_the_direction_after_the_file(tiny_dir, tmp_path, monkeypatch):
    """Without --name the direction takes the file's stem, in the user directions folder."""
    from typer.testing import CliRunner

    from steerkit.cli import app
    from steerkit.directions import load_direction

    monkeypatch.setenv("STEERKIT_HOME", str(tmp_path / "home"))
    vec = tmp_path / "villain-cv.npy"
    np.save(vec, np.random.default_rng(0).standard_normal(64).astype(np.float32))
    res = CliRunner().invoke(app, ["directions", "import", str(vec), "--layer", "1", "--model", str(tiny_dir)])
    assert res.exit_code == 0, res.output
    d = load_direction(tmp_path / "home" / "directions" / "tiny-llama" / "villain-cv.safetensors")
    assert d.name == "villain-cv" and d.layer == 1
