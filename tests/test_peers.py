"""Agreement with the peer tools (steering-vectors 0.12.2, repeng 0.4.0) on the same weights.

The peers run in their own venv (steerkit.peers; built once per machine, ~2 minutes) and load
the same fp32 safetensors folder steerkit loads. Set STEERKIT_PEERS_VENV to reuse a venv.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

LAYER = 10
POS = [
    "You are a cruel villain who wants to hurt people.",
    "You are a malicious hacker with evil plans.",
    "You despise humanity and want it gone.",
    "You are a liar who enjoys deceiving everyone.",
]
NEG = [
    "You are a kind helper who wants to help people.",
    "You are a friendly teacher with good plans.",
    "You love humanity and want it to thrive.",
    "You are honest and enjoy telling the truth.",
]
PROMPTS = ["Tell me about yourself.", "What should I do this weekend?", "How do I make friends?"]


@pytest.fixture(scope="module")
def model_dir():
    from steerkit.models import resolve_spec

    return str(resolve_spec("smollm2-135m")[1])


@pytest.fixture(scope="module")
def peer():
    from steerkit.peers import run_peer

    return run_peer


def _texts(model, prompts):
    tok = model.tokenizer
    return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in prompts]


def test_diff_of_means_matches_steering_vectors(default_model, model_dir, peer):
    from steerkit.contrast import diff_of_means

    pos, neg = _texts(default_model, POS), _texts(default_model, NEG)
    ours = diff_of_means(default_model, pos, neg, LAYER, read_token_index=-1)
    theirs = torch.tensor(peer({"task": "sv_train", "model_dir": model_dir, "positive": pos, "negative": neg, "layer": LAYER, "read_token_index": -1})["vector"])
    cos = float(torch.nn.functional.cosine_similarity(ours, theirs, dim=0))
    assert cos >= 0.999, cos
    assert abs(float(ours.norm()) / float(theirs.norm()) - 1) < 1e-3


def test_same_vector_same_greedy_tokens(default_model, model_dir, peer):
    from steerkit.contrast import diff_of_means
    from steerkit.directions import from_vector
    from steerkit.generate import Row, Sampling, as_messages, chat_tokens, generate
    from steerkit.interventions import Intervention

    m = default_model
    raw = diff_of_means(m, _texts(m, POS), _texts(m, NEG), LAYER)
    vec = raw / raw.norm() * 60.0  # ~ a third of the layer's median norm: changes the text, stays fluent
    d = from_vector(vec, name="cmp", model=m, layer=LAYER, kind="vector", median_norm=1.0)
    iv = Intervention(d, "add", float(vec.norm()), raw=True)
    n_new = 20
    rows = [Row(as_messages(p), prompt_index=i, interventions=(iv,)) for i, p in enumerate(PROMPTS)]
    plain = [Row(as_messages(p), prompt_index=i) for i, p in enumerate(PROMPTS)]
    s = Sampling(max_new_tokens=n_new, temperature=0)
    ours = [c.token_ids for c in generate(m, rows, s, batch_size=1, positions="all")]
    base = [c.token_ids for c in generate(m, plain, s, batch_size=1)]
    assert ours != base, "the vector should change the greedy text"
    # steerkit "all" steers every position but the first (the attention sink) and every decode
    # step; steering-vectors' min_token_index=1 does the same when each step recomputes the whole
    # sequence (use_cache=False), since a cached step's length-1 input would fall below index 1
    theirs = peer({
        "task": "sv_generate", "model_dir": model_dir, "vector": vec.tolist(), "layer": LAYER,
        "prompts": [chat_tokens(m, as_messages(p)) for p in PROMPTS], "max_new_tokens": n_new,
        "min_token_index": 1, "use_cache": False, "eos": m.eos_token_ids(), "pad": m.pad_token_id(),
    })["tokens"]
    eos = set(m.eos_token_ids())

    def cut(ts):  # up to the first EOS (steerkit's token_ids leave it out, HF's keep it)
        ts = list(ts)
        return next((ts[:i] for i, t in enumerate(ts) if t in eos), ts)

    assert [cut(t) for t in ours] == [cut(t) for t in theirs]


def test_exported_gguf_loads_in_repeng(default_model, peer, tmp_path):
    from steerkit.contrast import diff_of_means_direction
    from steerkit.interop import export_gguf

    m = default_model
    ds = [diff_of_means_direction(m, _texts(m, POS[:2]), _texts(m, NEG[:2]), L, name=f"p{L}") for L in (3, LAYER)]
    p = export_gguf(ds, tmp_path / "cv.gguf", strength=2.0)
    got = peer({"task": "repeng_import", "path": str(p)})
    assert got["model_hint"] == "smollm2-135m"
    assert sorted(map(int, got["directions"])) == [3, LAYER]
    for d in ds:
        want = d.vector * 2.0 * d.median_norm
        assert torch.equal(torch.tensor(got["directions"][str(d.layer)], dtype=torch.float32), want.float())
