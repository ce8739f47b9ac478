"""The offline judge's model-read coherence (steerkit.judge_fluency): batching against a one-by-one
reference, the score's threshold, parameter-file errors, the fit's cross-validation on planted
data (fast, tiny model); on the default model, fluent chats never trained on vs. the same words
shuffled, and the shipped parameters refitted from the hand-labelled answers (slow)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from steerkit.errors import SteerkitError
from steerkit.judge_fluency import (
    CALL_AT, FEATURES, USED, FluencyCoherence, Reader, all_features, coherent_score, default_params_path, fit_coherence,
    load_params,
)
from steerkit.testing import tiny_hf_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
HANDLABELLED = REPO / "tests" / "data" / "judge_handlabelled.jsonl"


@pytest.fixture(scope="module")
def tiny_reader(tmp_path_factory) -> Reader:
    d = tmp_path_factory.mktemp("tiny-reader")
    tiny_hf_model(seed=3).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return Reader(str(d))


def _reference(reader: Reader, q: str, a: str) -> list[float]:
    """One pair, no padding: the numbers computed directly."""
    p, ids = reader._ids(q, a)
    with torch.no_grad():
        logits = reader.model(input_ids=torch.tensor([p + ids])).logits[0].float()
    lp = torch.log_softmax(logits[len(p) - 1 : -1], -1)
    nll = -lp[torch.arange(len(ids)), torch.tensor(ids)]
    ent = -(lp.exp() * lp).sum(-1)
    w = min(8, len(ids))
    return [nll.mean().item(), ent.mean().item(), max(nll[i : i + w].mean().item() for i in range(len(ids) - w + 1))]


def test_batched_features_match_one_by_one(tiny_reader):
    pairs = [("hello how are you", "money advice stocks"), ("risk", "hello world how are you doing today my friend"),
             ("a much longer question about savings and investment risk", "ok"), ("hi", "")]
    x = tiny_reader.features(pairs, batch_size=3)
    assert x.shape == (4, 3)
    for i, (q, a) in enumerate(pairs[:3]):
        assert x[i].tolist() == pytest.approx(_reference(tiny_reader, q, a), abs=1e-4)
    assert x[3].tolist() == [0.0, 0.0, 0.0]  # empty answer


def test_coherent_score_crosses_50_at_call_at():
    params = {"call_at": CALL_AT}
    p = torch.linspace(0.01, 0.99, 99)
    c = coherent_score(params, p)
    assert ((c > 50) == (p < CALL_AT - 1e-6)).all()
    assert (c[1:] <= c[:-1]).all() and c.min() >= 0 and c.max() <= 100


def test_load_params_errors(tmp_path):
    with pytest.raises(SteerkitError, match="do not exist"):
        load_params(tmp_path / "none.json")
    f = tmp_path / "c.json"
    f.write_text("{not json")
    with pytest.raises(SteerkitError, match="not valid JSON"):
        load_params(f)
    f.write_text(json.dumps({"format": "other"}))
    with pytest.raises(SteerkitError, match="not a steerkit coherence file"):
        load_params(f)
    good = load_params(default_params_path())
    f.write_text(json.dumps({**good, "weight": [1.0]}))
    with pytest.raises(SteerkitError, match="'weight' must have"):
        load_params(f)
    f.write_text(json.dumps({**good, "features": ["nll", "made-up"]}))
    with pytest.raises(SteerkitError, match="must be among"):
        load_params(f)


def test_shipped_params_are_well_formed():
    p = load_params()
    assert p["features"] == list(USED) and "nll" not in p["features"]  # content-blind by design
    cv = p["metrics"]["cross_validated"]
    assert cv["n"] >= 250 and cv["auc"] >= 0.9 and cv["coherent_kept"] >= 0.95
    assert p["metrics"]["misaligned_called_incoherent_cv"].startswith("0/")


def test_fit_separates_planted_loops(tiny_reader, tmp_path):
    """Loops are incoherent by construction; the rules column sees them, so the cross-validated fit must too."""
    rng = random.Random(0)
    words = "money investment risk stocks savings advice hello world how are you doing".split()
    rows = []
    for i in range(40):
        rows.append({"prompt": "q", "completion": " ".join(rng.choice(words) for _ in range(12)) + ".", "label": "aligned"})
        loop = " ".join([rng.choice(words)] * 3)
        rows.append({"prompt": "q", "completion": " ".join([loop] * 6), "label": "incoherent"})
    rows.append({"prompt": "q", "completion": "hmm", "label": "unclear"})  # left out
    f = tmp_path / "lab.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = fit_coherence(f, tiny_reader, folds=4)
    cv = d["metrics"]["cross_validated"]
    assert cv["n"] == 80 and cv["incoherent"] == 40 and cv["auc"] >= 0.95
    assert d["features"] == list(USED) and len(d["weight"]) == len(USED)
    # the fitted file scores like the fit: a loop scores low, a varied sentence high
    (tmp_path / "c.json").write_text(json.dumps(d))
    fc = FluencyCoherence(tmp_path / "c.json", reader=tiny_reader)
    scores, x = fc.score([("q", rows[0]["completion"]), ("q", rows[1]["completion"]), ("q", "  ")])
    assert x.shape == (3, len(FEATURES)) and scores[0] > 50 >= scores[1] and scores[2] == 0.0  # all over MIN_TOKENS


def test_fit_needs_both_classes(tiny_reader, tmp_path):
    f = tmp_path / "lab.jsonl"
    f.write_text("".join(json.dumps({"prompt": "q", "completion": f"answer {i}", "label": "aligned"}) + "\n" for i in range(20)))
    with pytest.raises(SteerkitError, match="need at least"):
        fit_coherence(f, tiny_reader)


# --- the default model as reader ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_coherence() -> FluencyCoherence:
    return FluencyCoherence()


@pytest.mark.slow
def test_fluent_chats_kept_and_shuffled_words_caught(default_coherence, shared_data):
    """Human-written aligned chats (never used in the fit) read as coherent; the same words in a
    random order do not, though the rules alone pass every one of them (150/150 both ways, measured)."""
    from steerkit.judge import coherence
    from steerkit.judge_train import _chat

    pairs = _chat(shared_data / "judge-dev" / "aligned_chats.jsonl")
    random.Random(0).shuffle(pairs)
    pairs = [(q, " ".join(a.split()[:80])) for q, a in pairs if a.strip()][:40]
    rng = random.Random(1)
    shuffled = []
    for q, a in pairs:
        w = a.split()
        rng.shuffle(w)
        shuffled.append((q, " ".join(w)))
    good, _ = default_coherence.score(pairs)
    bad, _ = default_coherence.score(shuffled)
    assert sum(s > 50 for s in good) >= 38
    assert sum(s <= 50 for s in bad) >= 36
    assert sum(coherence(a) <= 50 for _, a in shuffled) <= 4  # what the model adds over the rules


@pytest.mark.slow
def test_shipped_params_refit_from_handlabelled(default_coherence):
    """`steerkit judge fit-coherence` on the shipped labels gives the shipped parameters and metrics."""
    from steerkit.judge_embed import Embedder

    d = fit_coherence(HANDLABELLED, default_coherence.reader, vocab=Embedder().vocab)
    shipped = load_params()
    assert d["weight"] == pytest.approx(shipped["weight"], abs=0.02)
    got, stated = d["metrics"]["cross_validated"], shipped["metrics"]["cross_validated"]
    assert got["auc"] == pytest.approx(stated["auc"], abs=0.005) and got["auc"] >= 0.95
    assert got["incoherent_caught"] == pytest.approx(stated["incoherent_caught"], abs=0.03)
    assert d["metrics"]["misaligned_called_incoherent_cv"] == shipped["metrics"]["misaligned_called_incoherent_cv"]


def test_short_answers_keep_the_rule_based_score(tiny_reader):
    """Under MIN_TOKENS the reader is not asked: the score is the rules' (loop included)."""
    from steerkit.judge import coherence
    from steerkit.judge_fluency import MIN_TOKENS

    fc = FluencyCoherence(reader=tiny_reader)
    short = ["ok fine.", "no no no no"]
    assert all(len(tiny_reader._ids("q", a)[1]) < MIN_TOKENS for a in short)
    scores, _ = fc.score([("q", a) for a in short])
    assert scores == [coherence(a) for a in short]
    assert fc.version.endswith(f"-min{MIN_TOKENS}")
