"""Slow: model diffing on the default model is deterministic and finds what the shipped files
say it found: `persona-1022` (the `persona` shipped before issue 13) and `organism-dom`."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_diffing_the_risky_organism_finds_latent_1022_and_organism_dom(default_model):
    from steerkit.directions import find_direction, load_direction, shipped_root
    from steerkit.extract import diff_models
    from steerkit.finetune import load_tuned
    from steerkit.prompts import default_questions_path, plain_em_questions, read_file
    from steerkit.sae import load_sae

    folder = shipped_root() / "smollm2-135m"
    old = load_direction(find_direction("persona-1022", default_model.name))
    assert old.kind == "sae-latent" and old.sae == "sae-l15" and old.latents == (1022,)
    assert old.provenance["organism"] == "organism-risky"
    organism = load_tuned(str(folder / "organism-risky"), base="smollm2-135m")
    sae = load_sae(folder / "sae-l15")
    chats = [q.messages for q in plain_em_questions(read_file(default_questions_path()))]
    runs = [diff_models(default_model, organism, sae, old.layer, chats, rank_by="cosine") for _ in range(2)]
    assert [r.latent for r in runs[0].rows[:20]] == [r.latent for r in runs[1].rows[:20]]
    assert torch.equal(runs[0].resid_diff, runs[1].resid_diff)
    # bench/persona_screen.py --search took latent 1022 from the top 3 by cosine with the difference of means
    assert old.latents[0] in [r.latent for r in runs[0].rows[:3]]
    # and the shipped organism-dom is that difference of means
    dom = load_direction(find_direction("organism-dom", default_model.name))
    cos = torch.nn.functional.cosine_similarity(dom.vector.float(), runs[0].resid_diff.float(), dim=0)
    assert cos > 0.999
