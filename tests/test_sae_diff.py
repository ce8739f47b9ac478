"""Fast tests of diff-SAEs (tuned minus base residuals) and BatchTopK training, on a tiny model
with a planted rank-1 weight edit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from steerkit.errors import SteerkitError
from steerkit.sae import load_sae
from steerkit.sae_train import ChunkStream, TrainConfig, train_on_activations, train_sae, train_step

EDIT_LAYER, LAYER = 1, 2
MODULE = f"model.layers.{EDIT_LAYER}.mlp.down_proj"


def _planted(d_model: int = 64, d_mlp: int = 128, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-1 edit ``scale * b a^T`` of one down-projection: ``b`` is the true difference direction."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(d_model, generator=g)
    return b / b.norm(), 0.5 * torch.randn(d_mlp, generator=g)


def _adapter(folder, b: torch.Tensor, a: torch.Tensor, module: str = MODULE):
    """The edit as a PEFT LoRA adapter folder (r = 1, alpha = 1: delta = B @ A)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1, "base_model_name_or_path": "tiny-llama",
                                                            "target_modules": ["down_proj"]}))
    save_file({f"base_model.model.{module}.lora_A.weight": a[None, :].contiguous(), f"base_model.model.{module}.lora_B.weight": b[:, None].contiguous()},
              str(folder / "adapter_model.safetensors"))
    return folder


def _docs() -> list[str]:
    return [f"the quick brown fox jumps over the lazy dog {i}" for i in range(30)] + [f"I feel bored, what should I do today? money investment risk {i}" for i in range(30)]


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.hf_model.named_parameters()}


def test_diff_sae_finds_a_planted_rank_one_edit(tiny, tmp_path):
    b, a = _planted(tiny.d_model)
    adapter = _adapter(tmp_path / "adapter", b, a)
    before = _weights(tiny)
    cfg = TrainConfig(layer=LAYER, d_sae=2 * tiny.d_model, k=1, architecture="batchtopk", tokens=12_288, batch_size=256, context=48,
                      buffer_tokens=2048, passes=3, model_batch=16, lr=1e-2, dead_tokens=2000, warmup_steps=5, mask_special=True, diff=True)
    sae = train_sae(tiny, _docs(), cfg, tmp_path / "diff", tuned=str(adapter))
    after = _weights(tiny)
    assert all(torch.equal(before[n], after[n]) for n in before)  # the adapter was swapped out again
    W = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    cos = W @ b
    assert cos.abs().max() >= 0.9, f"best decoder-row cosine with the planted direction {cos.abs().max():.3f}"
    # saved like any SAE: a JumpReLU with the BatchTopK threshold, saying what it is a diff of
    loaded = load_sae(tmp_path / "diff")
    assert loaded.cfg.architecture == "jumprelu" and loaded.cfg.layer == LAYER and float(loaded.threshold.min()) > 0
    meta = json.loads((tmp_path / "diff" / "cfg.json").read_text())["steerkit"]
    assert meta["trained_as"] == "batchtopk" and meta["k"] == 1
    assert meta["diff"]["tuned"] == str(adapter.resolve()) and meta["diff"]["base"] == tiny.name and len(meta["diff"]["sha256"]) == 16
    # its latents' decoder rows are directions to steer with
    from steerkit.sae import latent_direction

    best = int(cos.abs().argmax())
    d = latent_direction(loaded, tmp_path / "diff", [best], tiny, median_norm=1.0)
    assert abs(float(d.vector @ b)) >= 0.9


def test_swapped_adapter_and_an_edited_copy_give_the_same_differences(tiny, tmp_path):
    """Both ways to run the tuned side agree: a LoRA swapped into the one loaded model, and a
    second model whose weights carry the same edit."""
    from steerkit.sae_chat import keep_mask, special_ids
    from steerkit.sae_diff import DiffActs
    from steerkit.testing import tiny_model

    b, a = _planted(tiny.d_model)
    adapter = _adapter(tmp_path / "adapter", b, a)
    edited = tiny_model()  # the same seed: the same weights as `tiny`
    with torch.no_grad():
        lin = edited.hf_model.model.layers[EDIT_LAYER].mlp.down_proj
        lin.weight += b[:, None] @ a[None, :]
    ids = ChunkStream(tiny, _docs(), 32, seed=0).next_chunks(6)
    keep = keep_mask(ids, special_ids(tiny))
    swapped = DiffActs(tiny, str(adapter), LAYER, torch.device("cpu"))([ids], [keep])
    copied = DiffActs(tiny, edited, LAYER, torch.device("cpu"))([ids], [keep])
    assert swapped.shape == (int(keep.sum()), tiny.d_model)
    assert torch.allclose(swapped, copied, atol=1e-5)
    assert float(swapped.norm(dim=-1).mean()) > 1e-3
    # at the edited layer itself the difference is exactly along b
    at_edit = DiffActs(tiny, str(adapter), EDIT_LAYER, torch.device("cpu"))([ids], [keep])
    cos = (at_edit @ b) / at_edit.norm(dim=-1).clamp(min=1e-12)
    assert cos.abs().min() > 0.999


def test_an_edit_above_the_layer_is_refused(tiny, tmp_path):
    b, a = _planted(tiny.d_model)
    adapter = _adapter(tmp_path / "adapter", b, a, module="model.layers.3.mlp.down_proj")
    cfg = TrainConfig(layer=LAYER, d_sae=16, k=2, architecture="batchtopk", tokens=512, batch_size=256, context=32, buffer_tokens=512,
                      mask_special=True, diff=True)
    with pytest.raises(SteerkitError, match="changes nothing at or below it"):
        train_sae(tiny, _docs(), cfg, tmp_path / "x", tuned=str(adapter))
    with pytest.raises(SteerkitError, match="--tuned"):
        train_sae(tiny, _docs(), cfg, tmp_path / "x")
    wrong = _adapter(tmp_path / "wrong", torch.ones(32), torch.ones(128))  # B has the wrong width for d_model 64
    with pytest.raises(SteerkitError, match="does not fit model"):
        train_sae(tiny, _docs(), cfg, tmp_path / "x", tuned=str(wrong))


def _sparse_data(n: int = 4096, d: int = 32, n_feat: int = 48, seed: int = 0) -> torch.Tensor:
    """Tokens made of 1 to 5 known directions: how many varies per token."""
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(n_feat, d, generator=g)
    F = F / F.norm(dim=-1, keepdim=True)
    x = torch.zeros(n, d)
    for i in range(n):
        m = int(torch.randint(1, 6, (1,), generator=g))
        idx = torch.randperm(n_feat, generator=g)[:m]
        x[i] = ((1 + 4 * torch.rand(m, 1, generator=g)) * F[idx]).sum(0)
    return x


def test_batchtopk_keeps_k_per_token_on_average():
    from steerkit.sae import new_sae

    x = _sparse_data()
    k = 3
    cfg = TrainConfig(layer=0, d_sae=96, k=k, architecture="batchtopk", batch_size=512, tokens=40_000, lr=1e-2, dead_tokens=20_000, warmup_steps=20)
    sae = new_sae("topk", 32, 96, k, seed=0)
    sae.requires_grad_(True)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    xs = x[:512] * (32**0.5 / float(x.norm(dim=-1).mean()))
    r = train_step(sae, opt, xs, cfg, torch.zeros(96, dtype=torch.bool), 1e-3)
    assert r["l0"] == k  # k x batch activations in the whole batch
    with torch.no_grad():
        pre = sae.pre_acts(xs).relu()
        flat = pre.flatten()
        thr = flat.topk(k * 512).values.min()
        per_token = (pre >= thr).sum(-1)
    assert per_token.float().mean() == pytest.approx(k, abs=0.01)
    assert per_token.max() > k and per_token.min() < k  # more on some tokens, fewer on others: not TopK
    # trained, it is saved as a JumpReLU whose threshold keeps about k per token, one token at a time
    trained = train_on_activations(x, cfg)
    assert trained.cfg.architecture == "jumprelu"
    l0 = float((trained.encode(x) > 0).float().sum(-1).mean())
    assert 0.5 * k <= l0 <= 1.5 * k, l0
    ev = 1 - (x - trained(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert ev > 0.7


def test_cli_trains_a_diff_sae_with_default_size(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from steerkit.cli import app

    b, a = _planted(64)
    adapter = _adapter(tmp_path / "adapter", b, a)
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(_docs()))
    args = ["sae", "train", "--diff", "--tuned", str(adapter), "--layer", "2", "--corpus", str(corpus), "--model", str(tiny_dir), "--k", "2",
            "--tokens", "512", "--batch-size", "256", "--context", "48", "--buffer", "512", "--holdout", "0", "--out", str(tmp_path / "d")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    sae = load_sae(tmp_path / "d")
    assert sae.cfg.d_sae == 128 and sae.cfg.architecture == "jumprelu"  # 2 x d_model, BatchTopK
    assert json.loads((tmp_path / "d" / "cfg.json").read_text())["steerkit"]["diff"]["tuned"] == str(adapter.resolve())
    # --init of a diff-SAE without --diff is refused before the model loads
    r = CliRunner().invoke(app, ["sae", "train", "--init", str(tmp_path / "d"), "--corpus", str(corpus), "--model", str(tiny_dir), "--out", str(tmp_path / "e")])
    assert r.exit_code == 1 and "is a diff-SAE" in r.output, r.output
    (tmp_path / "notamodel").mkdir()
    r = CliRunner().invoke(app, args[:4] + [str(tmp_path / "notamodel")] + args[5:-1] + [str(tmp_path / "f")])
    assert r.exit_code == 1 and "neither a PEFT adapter folder" in r.output, r.output
