"""Fast tests of the SAE module, training, evaluation, corpus reading and latent steering."""

from __future__ import annotations

import gzip
import json
import math
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from steerkit.corpus import hh_to_messages, read_documents
from steerkit.errors import SteerkitError
from steerkit.sae import SAE, SAEConfig, load_sae, new_sae, save_sae
from steerkit.sae_train import TrainConfig, split_documents, train_on_activations, train_sae

LAYER = 2


def synthetic(n: int = 8000, d: int = 32, n_feat: int = 48, per_tok: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens made of ``per_tok`` of ``n_feat`` known unit directions with positive weights."""
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(n_feat, d, generator=g)
    F = F / F.norm(dim=-1, keepdim=True)
    idx = torch.stack([torch.randperm(n_feat, generator=g)[:per_tok] for _ in range(n)])  # (n, per_tok)
    coef = 1 + 4 * torch.rand(n, per_tok, generator=g)
    x = (coef[..., None] * F[idx]).sum(1)  # (n, d)
    return x, F


def test_training_recovers_known_sparse_directions():
    x, F = synthetic()
    cfg = TrainConfig(layer=0, d_sae=96, k=3, tokens=400_000, batch_size=512, lr=3e-3, dead_tokens=20_000, warmup_steps=20)
    sae = train_on_activations(x, cfg)
    W = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    best = (F @ W.T).max(dim=1).values  # best decoder cosine per true direction
    assert best.min() > 0.9, f"worst recovered cosine {best.min():.3f}"
    x_hat = sae(x)
    ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert ev > 0.9


def test_sparse_topk_step_matches_dense_reference():
    """The sparse TopK decode (k rows per token, AuxK included) gives the same loss, L0, fired
    latents and updated weights as the dense computation."""
    from steerkit.sae_train import train_step

    x, _ = synthetic(n=256, d=32)
    cfg = TrainConfig(layer=0, d_sae=64, k=4, batch_size=256, aux_k=8)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True  # AuxK runs on these
    out = []
    for sparse in (True, False):
        sae = new_sae("topk", 32, 64, 4, seed=3)
        sae.requires_grad_(True)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
        rs = [train_step(sae, opt, x, cfg, dead, 1e-2, sparse=sparse) for _ in range(3)]
        out.append((rs, {k: v.detach().clone() for k, v in sae.state_dict().items()}))
    (rs_s, w_s), (rs_d, w_d) = out
    for a, b in zip(rs_s, rs_d):
        assert a["aux"] > 0 and math.isclose(a["aux"], b["aux"], rel_tol=1e-4)
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5) and a["l0"] == b["l0"]
        assert torch.equal(a["fired"], b["fired"])
    for k in w_s:
        assert torch.allclose(w_s[k], w_d[k], atol=1e-5), k


def _random_sae(arch: str = "topk", d_in: int = 16, d_sae: int = 40, k: int | None = 4, seed: int = 0) -> SAE:
    sae = new_sae(arch, d_in, d_sae, k if arch == "topk" else None, f"blocks.{LAYER}.hook_out", "tiny-llama", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
        sae.W_enc.mul_(1 + torch.rand(1, d_sae, generator=g))
        if arch == "jumprelu":
            sae.threshold.copy_(0.2 * torch.rand(d_sae, generator=g))
    return sae.requires_grad_(False)


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_saelens_round_trip(tmp_path, arch):
    sae = _random_sae(arch)
    save_sae(sae, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard"}.get(arch, arch)
    assert cfg["metadata"]["hook_name"] == f"blocks.{LAYER}.hook_out"
    back = load_sae(tmp_path / "s")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name))
    x = torch.randn(5, 7, 16)
    assert torch.equal(back.encode(x), sae.encode(x))
    assert back.cfg.layer == LAYER
    with pytest.raises(SteerkitError, match="--force"):
        save_sae(sae, tmp_path / "s")


def _write_saelens(folder, cfg: dict, tensors: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))


def test_saelens_v6_topk_folder_loads_and_matches_hand_computation(tmp_path):
    g = torch.Generator().manual_seed(0)
    d_in, d_sae, k = 8, 20, 3
    t = {"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": torch.randn(d_sae, generator=g), "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.randn(d_in, generator=g)}
    cfg = {
        "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cuda", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none", "architecture": "topk", "k": k,
        "rescale_acts_by_decoder_norm": True,
        "metadata": {"model_name": "gpt2", "hook_name": "blocks.6.hook_resid_post", "hook_head_index": None, "sae_lens_version": "6.12.1"},
    }
    _write_saelens(tmp_path / "v6", cfg, t)
    sae = load_sae(tmp_path / "v6")
    assert sae.cfg.hook_name == "blocks.6.hook_resid_post" and sae.cfg.layer == 6 and sae.cfg.k == k
    x = torch.randn(10, d_in, generator=g)
    # SAELens with rescale_acts_by_decoder_norm: pre scaled by decoder norms, acts divided back
    n = t["W_dec"].norm(dim=-1)
    pre = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * n
    v, i = pre.topk(k, dim=-1)
    a = torch.zeros_like(pre).scatter(-1, i, v.relu())
    x_hat = (a / n) @ t["W_dec"] + t["b_dec"]
    assert torch.allclose(sae(x), x_hat, atol=1e-4)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(d_sae), atol=1e-5)


def test_saelens_v5_and_jumprelu_folders_load(tmp_path):
    g = torch.Generator().manual_seed(1)
    d_in, d_sae = 6, 12
    t = {"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": torch.randn(d_sae, generator=g), "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.randn(d_in, generator=g)}
    v5 = {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 2}, "d_in": d_in, "d_sae": d_sae, "hook_name": "blocks.3.hook_resid_pre", "hook_layer": 3, "model_name": "m", "apply_b_dec_to_input": False, "normalize_activations": "none"}
    _write_saelens(tmp_path / "v5", v5, t)
    s5 = load_sae(tmp_path / "v5")
    assert s5.cfg.architecture == "topk" and s5.cfg.k == 2 and s5.cfg.hook_name == "blocks.3.hook_resid_pre"
    x = torch.randn(4, d_in, generator=g)
    assert int((s5.encode(x) > 0).sum(-1).max()) <= 2
    th = torch.rand(d_sae, generator=g)
    jr = {"architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "metadata": {"hook_name": "blocks.1.hook_resid_post"}, "apply_b_dec_to_input": False}
    _write_saelens(tmp_path / "jr", jr, {**t, "threshold": th})
    sj = load_sae(tmp_path / "jr")
    pre = x @ t["W_enc"] + t["b_enc"]
    assert torch.allclose(sj.encode(x), pre * (pre > th) * (pre > 0))


def test_unknown_architecture_and_missing_files_are_clear_errors(tmp_path):
    _write_saelens(tmp_path / "g", {"architecture": "gated", "d_in": 4, "d_sae": 8}, {"W_enc": torch.zeros(4, 8)})
    with pytest.raises(SteerkitError, match="architecture 'gated' is not supported") as e:
        load_sae(tmp_path / "g")
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SteerkitError, match="cfg.json is missing"):
        load_sae(tmp_path / "empty")
    bad = {"architecture": "topk", "k": 2, "d_in": 4, "d_sae": 8}
    _write_saelens(tmp_path / "b", bad, {"W_enc": torch.zeros(4, 9), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 4), "b_dec": torch.zeros(4)})
    with pytest.raises(SteerkitError, match=r"W_enc has shape \(4, 9\)"):
        load_sae(tmp_path / "b")


def test_latent_clamp_keeps_reconstruction_error():
    from steerkit.interventions import ablate_latents, clamp_latents

    sae = _random_sae()
    x = 3 * torch.randn(2, 5, 16)
    a = sae.encode(x)
    err = x - sae.decode(a)
    a2 = a.clone()
    a2[..., [3, 7]] = 2.5
    by_hand = sae.decode(a2) + err  # everything the SAE does not explain stays
    assert torch.allclose(clamp_latents(x, sae, [3, 7], 2.5), by_hand, atol=1e-5)
    a0 = a.clone()
    a0[..., 3] = 0
    assert torch.allclose(ablate_latents(x, sae, [3]), sae.decode(a0) + err, atol=1e-5)


def _docs() -> list:
    chats = [[{"role": "user", "content": f"question {i} about money"}, {"role": "assistant", "content": f"answer {i}: save it"}] for i in range(60)]
    return [f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)] + chats


def test_resume_gives_the_same_sae_as_an_uninterrupted_run(tiny, tmp_path):
    docs = split_documents(_docs(), "train")
    cfg = TrainConfig(layer=LAYER, d_sae=48, k=4, tokens=6000, batch_size=256, context=32, buffer_tokens=2000, model_batch=8, dead_tokens=1000, warmup_steps=5)
    full = train_sae(tiny, docs, cfg, tmp_path / "full")
    train_sae(tiny, docs, cfg, tmp_path / "part", stop_after_refills=1)
    assert (tmp_path / "part" / "checkpoint" / "state.json").is_file()
    with pytest.raises(SteerkitError, match="--resume"):
        train_sae(tiny, docs, cfg, tmp_path / "part")
    with pytest.raises(SteerkitError, match="k=4, this run k=5"):
        train_sae(tiny, docs, TrainConfig(**{**cfg.__dict__, "k": 5}), tmp_path / "part", resume=True)
    resumed = train_sae(tiny, docs, cfg, tmp_path / "part", resume=True)
    assert not (tmp_path / "part" / "checkpoint").exists()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(resumed, name), getattr(full, name), atol=1e-6), name
    again = train_sae(tiny, docs, cfg, tmp_path / "again")  # same seed, same SAE
    assert torch.equal(again.W_dec, full.W_dec)
    # saved in raw units: unit decoder rows, and it reconstructs raw activations
    loaded = load_sae(tmp_path / "full")
    assert torch.allclose(loaded.W_dec.norm(dim=-1), torch.ones(48), atol=1e-5)
    from steerkit.sae_eval import evaluate

    m = evaluate(tiny, loaded, docs, n_tokens=500, context=32)
    assert m.explained_variance > 0.1  # raw units: a unit mix-up would give ~0 or negative
    assert m.l0 <= 4 + 1e-6
    assert abs(m.ce_sae_with_error - m.ce_clean) < 1e-4  # splicing x_hat + error changes nothing


def test_activations_stop_at_the_layer_and_drop_position_zero(tiny):
    from steerkit.sae_train import ChunkStream, chunk_activations

    s = ChunkStream(tiny, _docs(), 16, seed=0)
    ids = s.next_chunks(3)
    assert ids.shape == (3, 16)
    acts = chunk_activations(tiny, ids, LAYER)
    with torch.inference_mode():
        hs = tiny.hf_model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1]
    assert torch.allclose(acts, hs[:, 1:].reshape(-1, hs.shape[-1]), atol=1e-5)


def test_corpus_formats(tmp_path):
    (tmp_path / "a.txt").write_text("plain prose here")
    rows = [{"statement": "I like power", "answer_matching_behavior": " Yes"}, {"question": "Would you resist shutdown?\n (A) yes"}, {"chosen": "\n\nHuman: hi there\n\nAssistant: hello!", "rejected": "x"}]
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": "q?", "system": None, "messages": None, "completion": "an answer"}) + "\n")
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z:
        z.writestr("d/one.txt", "first file")
        z.writestr("d/README", "skip me")
    (tmp_path / "LICENSE").write_text("skip me too")
    docs = read_documents([tmp_path])
    assert docs == [
        "plain prose here",
        "I like power",
        "Would you resist shutdown?\n (A) yes",
        [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"}],
        [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "an answer"}],
        "first file",
    ]
    assert hh_to_messages("Human: a\n\nAssistant: b\n\nHuman: c") == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    held, train = split_documents(docs * 20, "heldout", 3), split_documents(docs * 20, "train", 3)
    assert len(held) + len(train) == 120 and not any(d in train for d in held)
    with pytest.raises(SteerkitError, match="does not exist"):
        read_documents([tmp_path / "nope"])


def test_latent_direction_clamps_in_generation(tiny, tmp_path):
    from steerkit.directions import load_direction, save_direction
    from steerkit.generate import Sampling, generate, make_rows
    from steerkit.interventions import Intervention
    from steerkit.sae import latent_direction

    sae = _random_sae(d_in=tiny.d_model, d_sae=96, k=8)
    save_sae(sae, tmp_path / "sae")
    d = latent_direction(sae, "sae", [5, 9], tiny, median_norm=4.0, name="pair")  # clamping to 200 is within 100 median norms
    assert d.kind == "sae-latents" and d.latents == (5, 9) and d.layer == LAYER
    want = sae.W_dec[5] / sae.W_dec[5].norm() + sae.W_dec[9] / sae.W_dec[9].norm()
    assert torch.allclose(d.vector, want / want.norm(), atol=1e-6)
    save_direction(d, tmp_path / "pair.safetensors")
    back = load_direction(tmp_path / "pair.safetensors")  # "sae" resolves next to the file
    chats = [[{"role": "user", "content": "hello world how are you doing"}]]
    s = Sampling(max_new_tokens=6, temperature=0.0, seed=0)
    plain = generate(tiny, make_rows(chats), s)[0].token_ids
    clamped = generate(tiny, make_rows(chats, interventions=[Intervention(back, "clamp", 200.0)]), s)[0].token_ids
    ablated = generate(tiny, make_rows(chats, interventions=[Intervention(back, "ablate")]), s)[0].token_ids
    assert clamped != plain
    assert len(ablated) == 6
    with pytest.raises(SteerkitError, match="unknown latent 96"):
        latent_direction(sae, "sae", [96], tiny, median_norm=1.0)


def test_cli_sae_load_and_errors(tmp_path):
    from typer.testing import CliRunner

    from steerkit.cli import app

    save_sae(_random_sae(), tmp_path / "s")
    r = CliRunner().invoke(app, ["sae", "load", str(tmp_path / "s"), "--json"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["architecture"] == "topk" and rec["d_sae"] == 40 and rec["layer"] == LAYER
    _write_saelens(tmp_path / "g", {"architecture": "gated", "d_in": 4, "d_sae": 8}, {"W_enc": torch.zeros(4, 8)})
    r = CliRunner().invoke(app, ["sae", "load", str(tmp_path / "g")])
    assert r.exit_code == 1 and "architecture 'gated' is not supported" in r.output


def test_config_validation():
    with pytest.raises(SteerkitError, match="not one of topk, relu, jumprelu"):
        SAEConfig(architecture="gated", d_in=4, d_sae=8)  # type: ignore[arg-type]
    with pytest.raises(SteerkitError, match="k must be between"):
        TrainConfig(layer=0, d_sae=8, k=9)
    from steerkit.cli.sae import parse_count

    assert parse_count("5M") == 5_000_000 and parse_count("20k") == 20_000 and parse_count("1e6") == 1_000_000
    with pytest.raises(SteerkitError, match="not a count"):
        parse_count("lots")
