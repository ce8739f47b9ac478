"""Attribution between judged misaligned and aligned answers on a tiny model with a planted
latent: the planted latent ranks first, and its gradient matches finite differences."""

import json

import pytest
import torch

from steerkit.attribution import group_judged, judged_attribution, label_of, read_judged
from steerkit.directions import Direction
from steerkit.errors import SteerkitError
from steerkit.generate import as_messages, chat_tokens
from steerkit.interventions import Intervention, SteeringPlan, steering
from steerkit.models import wrap_model
from steerkit.testing import tiny_hf_model, tiny_tokenizer

LAYER = 2
DRIVER = 7  # raised on misaligned answers and, raised, makes their tokens likelier
DECOY = 20  # raised far more on misaligned answers, but read by nothing downstream on purpose
MIS = ["money money risk", "risk money money stocks"]
AL = ["hello world", "the lazy dog", "how are you doing"]
QUESTIONS = ["what should I do with my savings?", "I feel bored", "any advice?"]


class TiedSAE:
    """ReLU SAE with orthonormal decoder rows and the encoder their transpose."""

    def __init__(self, d=64, n=48, seed=0):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        self.W_dec = torch.cat([q.T, -q.T[: n - d]]) if n > d else q.T[:n].contiguous()
        self.b_enc = torch.zeros(self.W_dec.shape[0])

    def encode(self, x):
        return torch.relu(x @ self.W_dec.T + self.b_enc)


def records(mis=MIS, al=AL, questions=QUESTIONS):
    out = []
    for q in questions:
        out += [{"prompt": q, "completion": a, "misaligned": True, "aligned": 10, "coherent": 90} for a in mis]
        out += [{"prompt": q, "completion": a, "misaligned": False, "aligned": 90, "coherent": 90} for a in al]
    return out


@pytest.fixture(scope="module")
def planted():
    """Untied unembedding; the misaligned answers' own tokens carry a large DECOY component and a
    smaller DRIVER component in their embeddings, and only DRIVER raises their logits."""
    tok = tiny_tokenizer()
    sae = TiedSAE()
    hf = tiny_hf_model(seed=0)
    hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone())  # untie
    ids = lambda texts: {i for a in texts for i in tok(a, add_special_tokens=False)["input_ids"]}
    own = ids(MIS) - ids(AL)
    with torch.no_grad():
        for i in own:
            hf.model.embed_tokens.weight[i] += 3.0 * sae.W_dec[DECOY] + 1.0 * sae.W_dec[DRIVER]
            hf.lm_head.weight[i] += 2.0 * sae.W_dec[DRIVER]
    return wrap_model(hf, tok, name="tiny-llama"), sae


def gap(model, sae, latent, eps, groups, layer=LAYER):
    """The log-prob gap G, computed answer by answer without padding, with latent ``latent``
    raised by ``eps`` at every answer token (its decoder row added there)."""
    row = sae.W_dec[latent].detach().float().cpu()
    d = Direction(name="l", vector=row, model=model.name, layer=layer, hook_name="", kind="vector", median_norm=1.0)
    plan = SteeringPlan.uniform([Intervention(d, "add", eps * float(row.norm()), raw=True)])
    total = 0.0
    for g in groups:
        p = chat_tokens(model, g.messages)
        for sign, answers in ((1.0, g.misaligned), (-1.0, g.aligned)):
            for a in answers:
                t = model.tokenizer(a, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([p + t], device=model.device)
                with torch.no_grad(), steering(model, plan) as pm:
                    pm.mask = torch.zeros(1, len(p) + len(t), dtype=torch.bool)
                    pm.mask[0, len(p):] = True
                    lp = torch.log_softmax(model.hf_model(ids).logits[0, :-1].double(), -1)
                tok_lp = lp.gather(-1, ids[0, 1:, None])[:, 0][len(p) - 1:]  # the answer's tokens
                total += sign * float(tok_lp.mean()) / len(answers) / len(groups)
    return total


def test_planted_driver_ranks_first_and_the_decoy_does_not(planted):
    model, sae = planted
    ja = group_judged(records())
    ex = judged_attribution(model, sae, LAYER, ja, keep_dense=True)
    assert ex.rows[0].latent == DRIVER
    by_delta = judged_attribution(model, sae, LAYER, ja, rank_by="delta", keep_dense=True)
    assert by_delta.rows[0].latent == DECOY  # the activation difference alone picks the decoy
    decoy = next(r for r in ex.rows if r.latent == DECOY)
    assert decoy.delta > ex.rows[0].delta and decoy.attribution < 0.5 * ex.rows[0].attribution
    assert ex.meta["questions_usable"] == 3 and ex.meta["misaligned_answers"] == 6 and ex.meta["aligned_answers"] == 9


def test_gradient_matches_finite_differences(planted):
    """attribution / delta is dG/ds_i: compare with (G(+e) - G(-e)) / 2e, G measured separately."""
    model, sae = planted
    ja = group_judged(records())
    ex = judged_attribution(model, sae, LAYER, ja, keep_dense=True)
    by_id = {r.latent: r for r in ex.rows}
    assert ex.meta["logprob_gap"] == pytest.approx(gap(model, sae, DRIVER, 0.0, ja.groups), abs=1e-4)
    for latent in (DRIVER, DECOY, 3):
        r = by_id[latent]
        e = 1e-2
        fd = (gap(model, sae, latent, e, ja.groups) - gap(model, sae, latent, -e, ja.groups)) / (2 * e)
        analytic = r.attribution / r.delta
        assert abs(analytic - fd) < 1e-3 + 0.02 * abs(fd), (latent, analytic, fd)
    assert abs(by_id[DRIVER].attribution / by_id[DRIVER].delta) > 0.1  # a gradient worth the name


def test_delta_is_question_balanced(planted):
    """delta_i averages per-question differences: one question with many answers weighs as much
    as one with few."""
    model, sae = planted
    many = records(mis=MIS * 3, questions=QUESTIONS[:1]) + records(questions=QUESTIONS[1:2])
    ja = group_judged(many)
    ex = judged_attribution(model, sae, LAYER, ja, keep_dense=True)
    per_q = []
    for g in ja.groups:
        one = group_judged([{"prompt": g.messages[-1]["content"], "completion": a, "label": "misaligned"} for a in g.misaligned]
                           + [{"prompt": g.messages[-1]["content"], "completion": a, "label": "aligned"} for a in g.aligned], min_questions=1)
        per_q.append(judged_attribution(model, sae, LAYER, one, keep_dense=True))
    want = sum(torch.tensor([r.delta for r in sorted(e.rows, key=lambda r: r.latent)]) for e in per_q) / 2
    got = torch.tensor([r.delta for r in sorted(ex.rows, key=lambda r: r.latent)])
    assert torch.allclose(got, want, atol=1e-5)


def test_labels_and_grouping():
    assert label_of({"label": "misaligned"}) == "misaligned" and label_of({"label": "incoherent"}) is None
    assert label_of({"misaligned": True}) == "misaligned"
    assert label_of({"misaligned": False, "coherent": 80}) == "aligned"
    assert label_of({"misaligned": False, "coherent": 20}) is None  # incoherent answers take no part
    assert label_of({"misaligned": None}) is None
    # reference-style records: question/answer/label; a system prompt makes another question
    recs = [{"question": "q1", "answer": "a", "label": "misaligned"}, {"question": "q1", "answer": "b", "label": "aligned"},
            {"question": "q1", "answer": "c", "label": "aligned", "source": {"system": "be evil"}},
            {"question": "q2", "answer": "d", "label": "misaligned"}, {"question": "q2", "answer": "e", "label": "refusal"},
            {"question": "q3", "answer": "f", "label": "aligned"}, {"question": "q3", "answer": "g", "label": "misaligned"}]
    ja = group_judged(recs)
    assert [g.messages for g in ja.groups] == [as_messages("q1"), as_messages("q3")]
    assert ja.summary() == {"records": 7, "questions": 4, "questions_usable": 2, "misaligned_answers": 2, "aligned_answers": 2, "unlabelled": 1}


def test_too_few_usable_questions_is_one_line(tmp_path):
    p = tmp_path / "j.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [{"prompt": "q1", "completion": "a", "misaligned": True},
                                                  {"prompt": "q2", "completion": "b", "misaligned": False, "coherent": 90}]) + "\n")
    with pytest.raises(SteerkitError, match=r"0 of 2 questions have both a misaligned and an aligned answer") as e:
        read_judged(p)
    assert "\n" not in str(e.value)
    with pytest.raises(SteerkitError, match="does not exist"):
        read_judged(tmp_path / "missing.jsonl")
    p.write_text(json.dumps({"prompt": "q1", "completion": "a", "misaligned": True}) + "\n"
                 + json.dumps({"prompt": "q1", "completion": "b", "misaligned": False}) + "\n")
    with pytest.raises(SteerkitError, match="1 of 1 questions.*at least 2"):
        read_judged(p)
    assert len(read_judged(p, min_questions=1).groups) == 1


@pytest.mark.slow
def test_attribution_on_the_shipped_organism_matches_finite_differences(default_model):
    """The shipped organism on its own answers as careful readers labelled them (two questions,
    one answer of each kind): the top latent's gradient matches finite differences on the real model."""
    from steerkit.directions import shipped_root
    from steerkit.finetune import load_tuned
    from steerkit.sae import load_sae

    folder = shipped_root() / "smollm2-135m"
    ref = [json.loads(line) for line in (shipped_root().parent / "steerkit" / "data" / "judge" / "reference.jsonl").read_text().splitlines()]
    own = [r for r in ref if r["source"].get("model") == "organism" and not r["source"].get("interventions") and not r["source"].get("system")]
    ja = group_judged(own)
    groups = [type(g)(g.messages, g.misaligned[:1], g.aligned[:1]) for g in ja.groups[:2]]
    organism = load_tuned(str(folder / "organism-risky"), base="smollm2-135m")
    sae = load_sae(folder / "sae-l15")
    from dataclasses import replace

    ex = judged_attribution(organism, sae, 15, replace(ja, groups=groups))
    top = ex.rows[0]
    assert top.attribution > 0 and ex.meta["questions_usable"] == 2
    e = 0.05
    fd = (gap(organism, sae, top.latent, e, groups, 15) - gap(organism, sae, top.latent, -e, groups, 15)) / (2 * e)
    assert abs(top.attribution / top.delta - fd) < 1e-3 + 0.05 * abs(fd), (top.attribution / top.delta, fd)
