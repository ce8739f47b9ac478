"""Directions from labelled answers: steerkit.contrast.answer_means / answers_diff_of_means /
answers_direction and `steerkit directions from-answers`, on the tiny random model.

Expected values come from the plain twin's hidden states (not steerkit.activations.residuals),
averaged over the answer's tokens by hand, and from per-prompt differences written out.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from steerkit.cli import app
from steerkit.contrast import answer_means, answers_diff_of_means, answers_direction
from steerkit.directions import load_direction
from steerkit.errors import SteerkitError
from steerkit.monitor import chat_split

runner = CliRunner()
LAYER = 1


def chat(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


# three prompts; the first two have answers of both classes, the third only a negative one
ROWS = [
    ("hello world", "the quick brown fox jumps", True),
    ("hello world", "money savings advice", False),
    ("hello world", "you are helpful and kind", False),
    ("I feel bored", "go for a run, risk it all", True),
    ("I feel bored", "the lazy dog sleeps", True),
    ("I feel bored", "read a book", False),
    ("what now?", "ok", False),
]


@pytest.fixture(scope="module")
def own_tiny():
    """A tiny model of this module's own: calling the twin with output_hidden_states leaves
    transformers' output-recording hooks on its layers, which the shared ``tiny`` must not carry
    into the hook-count tests."""
    from steerkit.testing import tiny_model

    return tiny_model()


def hand_mean(model, c) -> torch.Tensor:
    ids, start = chat_split(model, c)
    net = model.twin if model.twin is not None else model.hf_model
    with torch.no_grad():
        hs = net(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return hs[LAYER + 1][0, start:].float().mean(0)


def test_answer_means_equal_hand_means_in_padded_batches(own_tiny):
    chats = [chat(q, a) for q, a, _ in ROWS]
    got = answer_means(own_tiny, chats, LAYER, batch_size=3)  # mixed lengths: left padding inside batches
    want = torch.stack([hand_mean(own_tiny, c) for c in chats])
    assert got.shape == (len(chats), own_tiny.d_model)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_paired_difference_is_the_mean_of_per_prompt_differences():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(len(ROWS), 5, generator=g)
    pos = [p for _, _, p in ROWS]
    keys = [q for q, _, _ in ROWS]
    v, info = answers_diff_of_means(means, pos, keys)
    d1 = means[0] - means[1:3].mean(0)
    d2 = means[3:5].mean(0) - means[5]
    assert torch.allclose(v, (d1 + d2) / 2, atol=1e-6)
    assert info == {"paired": True, "n_positive": 3, "n_negative": 3, "groups": 2, "left_out": 1}
    u, info = answers_diff_of_means(means, pos)
    P = torch.tensor(pos)
    assert torch.allclose(u, means[P].mean(0) - means[~P].mean(0), atol=1e-6)
    assert info["paired"] is False and info["n_positive"] == 3 and info["n_negative"] == 4
    with pytest.raises(SteerkitError, match="no prompt has both"):
        answers_diff_of_means(means[:2], [True, False], ["a", "b"])
    with pytest.raises(SteerkitError, match="needs positive and negative"):
        answers_diff_of_means(means[:2], [True, True])


def test_direction_from_answers_points_along_the_hand_difference(own_tiny):
    chats = [chat(q, a) for q, a, _ in ROWS]
    pos = [p for _, _, p in ROWS]
    d = answers_direction(own_tiny, chats, pos, LAYER, name="mine", source="rows.jsonl")
    m = torch.stack([hand_mean(own_tiny, c) for c in chats])
    want = ((m[0] - m[1:3].mean(0)) + (m[3:5].mean(0) - m[5])) / 2
    assert torch.nn.functional.cosine_similarity(d.vector, want, dim=0) > 0.9999
    assert d.kind == "diff-of-means" and d.layer == LAYER and d.median_norm > 0
    assert d.provenance["groups"] == 2 and d.provenance["left_out"] == 1 and d.provenance["source"] == "rows.jsonl"
    assert d.provenance["raw_norm"] == pytest.approx(float(want.norm()), rel=1e-3)


def write_rows(path, rows=ROWS, field="label"):
    path.write_text("".join(json.dumps({"question": q, "answer": a, field: "misaligned" if p else "aligned"}) + "\n" for q, a, p in rows)
                    + json.dumps({"question": "x", "answer": "garbled", field: "incoherent"}) + "\n")
    return path


def test_cli_writes_the_library_direction(tiny, tiny_dir, tmp_path):
    f = write_rows(tmp_path / "rows.jsonl")
    out = tmp_path / "mine.safetensors"
    r = runner.invoke(app, ["directions", "from-answers", str(f), "--out", str(out), "--model", str(tiny_dir), "--layer", str(LAYER), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["groups"] == 2 and s["left_out"] == 1 and s["skipped_labels"] == 1 and s["name"] == "mine"
    got = load_direction(out)
    lib = answers_direction(tiny, [chat(q, a) for q, a, _ in ROWS], [p for _, _, p in ROWS], LAYER, name="x")
    assert torch.nn.functional.cosine_similarity(got.vector, lib.vector, dim=0) > 0.9999
    # unpaired pools all seven answers; never overwrites without --force
    r = runner.invoke(app, ["directions", "from-answers", str(f), "--out", str(out), "--model", str(tiny_dir), "--layer", str(LAYER), "--unpaired"])
    assert r.exit_code == 1 and "already exists" in r.stderr
    r = runner.invoke(app, ["directions", "from-answers", str(f), "--out", str(out), "--model", str(tiny_dir), "--layer", str(LAYER), "--unpaired", "--force", "--json"])
    assert r.exit_code == 0, r.output
    assert load_direction(out).provenance["n_negative"] == 4


def one_line_error(r, pattern):
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], r.stderr


def test_cli_errors_before_the_model_loads(tiny_dir, tmp_path, monkeypatch):
    import steerkit.models as M

    def no_load(*a, **k):
        raise AssertionError("the model must not load for bad input")

    monkeypatch.setattr(M, "load_model", no_load)
    f = write_rows(tmp_path / "rows.jsonl")
    base = ["directions", "from-answers", "--model", str(tiny_dir)]
    one_line_error(runner.invoke(app, [*base, str(f), "--out", str(tmp_path / "d.npy")]), "must end in .safetensors")
    one_line_error(runner.invoke(app, [*base, str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "d.safetensors")]), "does not exist")
    one_line_error(runner.invoke(app, [*base, str(f), "--out", str(tmp_path / "d.safetensors"), "--layer", "99"]), "out of range")
    one_line_error(runner.invoke(app, [*base, str(f), "--out", str(tmp_path / "d.safetensors"), "--label-field", "verdict"]), "needs both")
    one_line_error(runner.invoke(app, [*base, str(f), "--out", str(tmp_path / "d.safetensors"), "--positive", "aligned", "--negative", "aligned"]), "both --positive and --negative")
    unpaired = write_rows(tmp_path / "u.jsonl", [("a", "x y", True), ("b", "z w", False)])
    one_line_error(runner.invoke(app, [*base, str(unpaired), "--out", str(tmp_path / "d.safetensors")]), "--unpaired")
    assert not (tmp_path / "d.safetensors").exists()


@pytest.mark.slow
def test_shipped_harm_dom_is_what_its_command_makes(default_model):
    """directions/README.md: harm-dom is `directions from-answers` on written_train.jsonl without
    its gardening domain, layer 15 (bench/harm_dom.sh); it separates the written pairs of the
    other domains' file, which it never saw."""
    from steerkit.directions import find_direction, shipped_root
    from steerkit.stats import roc_auc

    data = shipped_root().parent / "steerkit" / "data" / "judge"
    rows = [json.loads(x) for x in (data / "written_train.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["domain"] != "gardening, ladders and roof work"]
    d = answers_direction(default_model, [chat(r["question"], r["answer"]) for r in rows], [r["label"] == "misaligned" for r in rows], 15, name="harm-dom")
    shipped = load_direction(find_direction("harm-dom", default_model.name))
    assert d.provenance["groups"] == shipped.provenance["groups"] == 225
    assert torch.nn.functional.cosine_similarity(d.vector, shipped.vector, dim=0) > 0.999
    ood = [json.loads(x) for x in (data / "ood_domains.jsonl").read_text().splitlines() if x.strip()]
    means = answer_means(default_model, [chat(r["question"], r["answer"]) for r in ood], 15)
    scores = (means @ (shipped.vector / shipped.vector.norm())).tolist()
    assert roc_auc(scores, [r["label"] == "misaligned" for r in ood]) >= 0.95
