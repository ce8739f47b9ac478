"""Logic that moved out of the CLI into the library (issue 15), tested where it now lives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steerkit.cli.common import rel_path, target_dir
from steerkit.contrast import read_contrast
from steerkit.errors import SteerkitError
from steerkit.fsutil import read_json_lines
from steerkit.model_specs import DEFAULT_ALIAS, spec_name
from steerkit.sae import load_sae_for, new_sae, sae_layer, save_sae


def test_read_contrast_reads_pairs_and_questions(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"pairs": [{"pos": "Be evil.", "neg": "Be kind."}], "questions": ["Hi?", 3]}))
    assert read_contrast(f) == ([("Be evil.", "Be kind.")], ["Hi?", "3"])
    f.write_text(json.dumps({"instruction": [{"pos": "a", "neg": "b"}], "questions": ["q"]}))
    assert read_contrast(f) == ([("a", "b")], ["q"])


@pytest.mark.parametrize(("text", "msg"), [
    ("{", "is not valid JSON"),
    (json.dumps({"pairs": [], "questions": ["q"]}), "expected"),
    (json.dumps({"pairs": [{"pos": "a"}], "questions": ["q"]}), "pair 0 needs 'pos' and 'neg'"),
])
def test_read_contrast_refuses_bad_files(tmp_path, text, msg):
    f = tmp_path / "c.json"
    f.write_text(text)
    with pytest.raises(SteerkitError, match=msg):
        read_contrast(f)
    with pytest.raises(SteerkitError, match="does not exist"):
        read_contrast(tmp_path / "missing.json")


def test_load_sae_for_checks_the_width_and_sae_layer_reads_the_hook(tiny, tmp_path):
    good = new_sae("topk", tiny.d_model, 16, 2, "blocks.1.hook_out", tiny.name)
    save_sae(good, tmp_path / "good")
    sae = load_sae_for(tmp_path / "good", tiny)
    assert sae.cfg.d_in == tiny.d_model and sae.W_dec.device == tiny.device
    assert sae_layer(sae, tmp_path / "good") == 1
    save_sae(new_sae("topk", tiny.d_model + 1, 16, 2, "blocks.1.hook_out"), tmp_path / "wide")
    with pytest.raises(SteerkitError, match=f"reads d_in {tiny.d_model + 1}, but {tiny.name} has d_model {tiny.d_model}"):
        load_sae_for(tmp_path / "wide", tiny)
    save_sae(new_sae("topk", tiny.d_model, 16, 2, None), tmp_path / "nohook")
    with pytest.raises(SteerkitError, match="pass --layer"):
        sae_layer(load_sae_for(tmp_path / "nohook", tiny), tmp_path / "nohook")


def test_spec_name_names_folders_without_loading():
    assert spec_name(None) == DEFAULT_ALIAS
    assert spec_name("default") == DEFAULT_ALIAS
    assert spec_name("HuggingFaceTB/SmolLM2-360M-Instruct") == "smollm2-360m-instruct"
    assert spec_name("/nowhere/My-Model.gguf") == "my-model"


def test_target_dir_and_rel_path(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERKIT_HOME", str(tmp_path / "home"))
    assert target_dir(tmp_path / "x", "m") == tmp_path / "x"
    assert target_dir(None, "m").name == "m" and target_dir(None, "m").parent.name == "directions"
    (tmp_path / "a" / "sae").mkdir(parents=True)
    (tmp_path / "a" / "dirs").mkdir()
    assert rel_path(tmp_path / "a" / "sae", tmp_path / "a" / "dirs") == str(Path("..") / "sae")


def test_read_json_lines_numbers_lines_and_names_faults(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text('{"a": 1}\n\n{"b": 2}\n')
    assert read_json_lines(f) == [(1, {"a": 1}), (3, {"b": 2})]
    assert read_json_lines("<stdin>", text='{"c": 3}') == [(1, {"c": 3})]
    f.write_text('{"a": 1}\n[1]\n')
    with pytest.raises(SteerkitError, match=r"r.jsonl:2: expected a JSON object"):
        read_json_lines(f)
    f.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(SteerkitError, match=r"r.jsonl:2 is not valid JSON"):
        read_json_lines(f)
    with pytest.raises(SteerkitError, match="answers file .* does not exist: give one"):
        read_json_lines(tmp_path / "none.jsonl", "answers", hint="give one")
    f.write_text("\n\n")
    with pytest.raises(SteerkitError, match="holds no records"):
        read_json_lines(f)


@pytest.mark.parametrize("fmt", ["npy", "pt"])
def test_export_plain_writes_what_load_plain_vector_reads(tmp_path, fmt):
    import torch

    from steerkit.directions import Direction
    from steerkit.interop import export_plain, load_plain_vector

    d = Direction(name="v", vector=torch.tensor([0.6, 0.8, 0.0]), model="m", layer=1, hook_name="blocks.1.hook_out",
                  kind="diff-of-means", median_norm=2.0)
    p = export_plain(d, tmp_path / f"v.{fmt}", fmt, strength=1.5)
    assert torch.allclose(load_plain_vector(p), torch.tensor([0.6, 0.8, 0.0]) * 3.0)
    with pytest.raises(SteerkitError):
        export_plain(d, tmp_path / f"v.{fmt}", fmt)  # exists: refused without force
