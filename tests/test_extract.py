"""Model diffing and contrastive ranking on a tiny model with a planted change."""

import copy

import pytest
import torch

from steerkit.extract import best_latent_set, diff_contrast, diff_models, rank_latents, side_stats
from steerkit.generate import as_messages
from steerkit.models import wrap_model
from steerkit.testing import tiny_hf_model, tiny_tokenizer

LAYER = 2
PLANTED = 11


class TiedSAE:
    """ReLU SAE whose encoder is its decoder transposed, rows orthonormal: latent i reads
    exactly the component along W_dec[i]."""

    def __init__(self, d=64, n=48, seed=0):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        self.W_dec = torch.cat([q.T, -q.T[: n - d]]) if n > d else q.T[:n].contiguous()
        self.b_enc = torch.zeros(self.W_dec.shape[0])

    def encode(self, x):
        return torch.relu(x @ self.W_dec.T + self.b_enc)


@pytest.fixture(scope="module")
def pair():
    hf = tiny_hf_model(seed=0, mlp_bias=True)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.down_proj.bias.zero_()
    base = wrap_model(hf, tiny_tokenizer(), name="tiny-llama")
    sae = TiedSAE()
    tuned_hf = copy.deepcopy(hf)
    with torch.no_grad():  # the planted change: block LAYER writes +3 along latent PLANTED
        tuned_hf.model.layers[LAYER].mlp.down_proj.bias += 3.0 * sae.W_dec[PLANTED]
    tuned = wrap_model(tuned_hf, tiny_tokenizer(), name="tiny-llama", source="planted")
    return base, tuned, sae


CHATS = [as_messages(q) for q in ("hello world", "I feel bored, what should I do?", "money advice please", "how are you doing")]


@pytest.mark.parametrize("rank_by", ["delta", "normalized", "cosine", "attribution"])
def test_planted_latent_ranks_first(pair, rank_by):
    base, tuned, sae = pair
    ex = diff_models(base, tuned, sae, LAYER, CHATS, rank_by=rank_by, keep_dense=True)
    assert ex.rows[0].latent == PLANTED
    assert ex.rows[0].delta > 1.0
    js = ex.to_json(top=5)
    assert js["latents"][0]["latent"] == PLANTED and js["layer"] == LAYER


def test_no_change_gives_zero_deltas(pair):
    base, _, sae = pair
    ex = diff_models(base, base, sae, LAYER, CHATS)
    assert max(abs(r.delta) for r in ex.rows) < 1e-5


def test_side_stats_match_hand_computation(pair):
    base, _, sae = pair
    from steerkit.activations import token_activations
    from steerkit.generate import chat_tokens

    s = side_stats(base, sae, LAYER, CHATS)
    acts = token_activations(base, [chat_tokens(base, c) for c in CHATS], LAYER)
    a = sae.encode(acts)
    assert s.n_tokens == acts.shape[0]
    assert torch.allclose(s.mean, a.mean(0), atol=1e-5)
    assert torch.allclose(s.freq, (a > 0).float().mean(0), atol=1e-6)
    assert torch.allclose(s.resid_mean, acts.mean(0), atol=1e-4)


def test_answer_tokens_only(pair):
    base, tuned, sae = pair
    answers = ["sure, here is a plan", "go for a walk", "save it", "fine thanks"]
    ex = diff_models(base, tuned, sae, LAYER, CHATS, answers=answers, tokens="answer", keep_dense=True)
    assert ex.rows[0].latent == PLANTED
    n_answer = sum(len(tiny_tokenizer()(a, add_special_tokens=False)["input_ids"]) for a in answers)
    assert ex.before.n_tokens == n_answer


def test_contrast_ranks_planted_system_prompt_latent():
    """A system prompt of one repeated token, whose embedding we plant along a latent, raises
    that latent over the negative prompt."""
    hf = tiny_hf_model(seed=3)
    tok = tiny_tokenizer()
    model = wrap_model(hf, tok, name="tiny-llama")
    sae = TiedSAE(seed=1)
    ex = diff_contrast(model, sae, 0, [("money money money", "hello hello hello")], ["how are you doing", "what should I do"], keep_dense=True)
    # the ranking follows the measured deltas, largest first
    deltas = [r.delta for r in ex.rows]
    assert deltas == sorted(deltas, reverse=True)
    assert ex.meta["mode"] == "contrast" and ex.before.n_tokens > 0


def test_dense_latents_ranked_last():
    from steerkit.extract import Side

    n = 4
    before = Side(mean=torch.tensor([5.0, 0.0, 0.0, 0.0]), freq=torch.tensor([0.9, 0.0, 0.01, 0.0]), std=torch.ones(n), resid_mean=torch.zeros(64), n_tokens=10)
    after = Side(mean=torch.tensor([9.0, 1.0, 0.5, 0.0]), freq=torch.tensor([0.9, 0.1, 0.1, 0.0]), std=torch.ones(n), resid_mean=torch.ones(64), n_tokens=10)

    class S:
        W_dec = torch.randn(n, 64)

    rows, _ = rank_latents(before, after, S, "delta")
    assert [r.latent for r in rows[:2]] == [1, 2] and rows[-1].latent == 0 and rows[-1].dense
    rows, _ = rank_latents(before, after, S, "delta", keep_dense=True)
    assert rows[0].latent == 0


def test_best_latent_set_recovers_combination():
    sae = TiedSAE()
    target = 2.0 * sae.W_dec[3] - 1.0 * sae.W_dec[17] + 0.5 * sae.W_dec[30]
    latents, weights, cos = best_latent_set(target, sae, k=3)
    assert sorted(latents) == [3, 17, 30] and cos > 0.999


def test_misalignment_gradient_matches_finite_difference(pair):
    """The gradient's component along a direction equals the finite-difference change of S
    when that direction is added at the layer (all usable positions)."""
    from steerkit.directions import Direction
    from steerkit.extract import misalignment_gradient
    from steerkit.generate import chat_tokens
    from steerkit.interventions import Intervention, SteeringPlan, steering

    base, _, _ = pair
    chats = CHATS[:2]
    mis, al = ["money money", "risk it all"], ["hello friend", "go for a walk"]
    g = misalignment_gradient(base, LAYER, chats, mis, al)
    u = torch.randn(base.d_model, generator=torch.Generator().manual_seed(5))
    u = u / u.norm()

    def S(eps):
        d = Direction(name="u", vector=u, model=base.name, layer=LAYER, hook_name="", kind="vector", median_norm=1.0)
        total = 0.0
        for sign, answers in ((1, mis), (-1, al)):
            for m, a in zip(chats, answers):
                p = chat_tokens(base, m)
                ids = p + base.tokenizer(a, add_special_tokens=False)["input_ids"]
                with torch.no_grad(), steering(base, SteeringPlan.uniform([Intervention(d, "add", eps, raw=True)])):
                    lp = torch.log_softmax(base.hf_model(torch.tensor([ids])).logits[0, :-1].double(), -1)
                tgt = torch.tensor(ids[1:])
                tok_lp = lp.gather(-1, tgt[:, None])[:, 0][len(p) - 1 :]
                total += sign * float(tok_lp.mean()) / len(chats)
        return total

    n_tok = sum(len(chat_tokens(base, m)) + len(base.tokenizer(a, add_special_tokens=False)["input_ids"]) - 1 for answers in (mis, al) for m, a in zip(chats, answers))
    fd = (S(1e-2) - S(-1e-2)) / 2e-2
    assert abs(float(g @ u) * n_tok - fd) < 1e-3 + 0.02 * abs(fd)
