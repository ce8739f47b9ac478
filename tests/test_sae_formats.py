"""SAE folders in the EleutherAI sparsify and saprmarks/dictionary_learning layouts: each written
here exactly as its library writes it (file names, config keys, tensor names and shapes), loaded
by steerkit and checked against that library's own forward pass, written out below from its
equations; refusals are one line; a loaded sparsify SAE steers the tiny model like a SAELens one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from steerkit.cli import app
from steerkit.errors import SteerkitError
from steerkit.sae import load_sae, save_sae
from steerkit.sae_formats import LAYOUTS, detect_format

runner = CliRunner()
LAYER = 2


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


def rand(g, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=g)


# --- sparsify: cfg.json + sae.safetensors per hookpoint -----------------------------------------


def sparsify_cfg(d_in: int, n: int, k: int, **over) -> dict:
    """cfg.json as SparseCoder.save_to_disk writes it: SparseCoderConfig.to_dict() plus d_in."""
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": n, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": False}
    cfg.update(over)
    cfg["d_in"] = d_in
    return cfg


def sparsify_tensors(d_in: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of a SparseCoder: encoder = nn.Linear(d_in, n), W_dec [n, d_in] (unit rows
    when normalize_decoder), b_dec [d_in]."""
    g = torch.Generator().manual_seed(seed)
    W_dec = rand(g, n, d_in)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    return {"encoder.weight": W_dec.clone() + rand(g, n, d_in, scale=0.3), "encoder.bias": rand(g, n, scale=0.2),
            "W_dec": W_dec, "b_dec": rand(g, d_in, scale=0.2)}


def write_sparsify(folder: Path, d_in: int = 16, n: int = 48, k: int = 4, seed: int = 0, tensors=None, **over) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True)
    t = tensors or sparsify_tensors(d_in, n, seed)
    save_file({k_: v.contiguous() for k_, v in t.items()}, str(folder / "sae.safetensors"), metadata={"format": "pt"})
    (folder / "cfg.json").write_text(json.dumps(sparsify_cfg(d_in, n, k, **over)))
    return t


def sparsify_forward(t: dict[str, torch.Tensor], k: int, x: torch.Tensor):
    """sparsify's SparseCoder.encode/decode: relu(linear(x - b_dec)) -> top-k (values, indices);
    decode sums the chosen W_dec rows weighted by the values, plus b_dec."""
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    recon = (vals[..., None] * t["W_dec"][idx]).sum(-2) + t["b_dec"]
    dense = torch.zeros_like(pre).scatter(-1, idx, vals)
    return dense, recon


def test_sparsify_folder_matches_its_own_forward_pass(tmp_path):
    d_in, n, k = 16, 48, 4
    t = write_sparsify(tmp_path / "sae-tiny-32x" / f"layers.{LAYER}", d_in, n, k)
    assert detect_format(tmp_path / "sae-tiny-32x" / f"layers.{LAYER}") == "sparsify"
    sae = load_sae(tmp_path / "sae-tiny-32x" / f"layers.{LAYER}")
    assert sae.source_format == "sparsify"
    c = sae.cfg
    assert (c.architecture, c.d_in, c.d_sae, c.k, c.apply_b_dec_to_input) == ("topk", d_in, n, k, True)
    assert c.hook_name == f"blocks.{LAYER}.hook_out" and c.layer == LAYER
    assert c.extra["source"]["format"] == "sparsify" and c.extra["source"]["hookpoint"] == f"layers.{LAYER}"
    x = 2 * torch.randn(3, 5, d_in)
    dense, recon = sparsify_forward(t, k, x)
    assert torch.allclose(sae.encode(x), dense, atol=1e-5)
    assert torch.allclose(sae(x), recon, atol=1e-5)
    assert torch.allclose(sae.decode(dense), recon, atol=1e-5)


def test_sparsify_expansion_factor_bf16_and_a_renamed_folder(tmp_path):
    d_in, k = 8, 3
    t = {n_: v.to(torch.bfloat16) for n_, v in sparsify_tensors(d_in, 4 * d_in, seed=3).items()}
    write_sparsify(tmp_path / "my-sae", d_in, 4 * d_in, k, tensors=t, num_latents=0, expansion_factor=4, multi_topk=True)
    sae = load_sae(tmp_path / "my-sae" / "cfg.json")  # a file of the folder names the folder
    assert sae.cfg.d_sae == 32 and sae.W_enc.dtype == torch.float32
    assert sae.cfg.hook_name is None and sae.cfg.layer is None  # the folder name says no layer
    assert sae.cfg.extra["source"]["multi_topk"] is True and sae.cfg.extra["source"]["dtype"] == "bfloat16"
    x = torch.randn(6, d_in)
    dense, _ = sparsify_forward({n_: v.float() for n_, v in t.items()}, k, x)
    assert torch.allclose(sae.encode(x), dense, atol=1e-5)


def test_sparsify_parent_folder_lists_its_hookpoints(tmp_path):
    parent = tmp_path / "sae-SmolLM2-135M-64x"
    for i in (0, 2, 10):
        write_sparsify(parent / f"layers.{i}", seed=i)
    with pytest.raises(SteerkitError) as e:
        load_sae(parent)
    msg = one_line(e)
    assert "layers.0, layers.2, layers.10" in msg and "name one" in msg and "sparsify" in msg
    assert load_sae(parent / "layers.10").cfg.layer == 10


@pytest.mark.parametrize("over, folder, want", [
    ({"transcode": True}, "layers.1", "transcoder"),
    ({"skip_connection": True}, "layers.1", "skip connection"),
    ({"activation": "groupmax"}, "layers.1", "activation 'groupmax'"),
    ({}, "layers.1.mlp", "'mlp' inside layer 1, not the residual stream"),
    ({}, "embed_tokens", "reads the embeddings"),
])
def test_sparsify_features_steerkit_cannot_express_are_refused(tmp_path, over, folder, want):
    t = sparsify_tensors(16, 48)
    if over.get("skip_connection"):
        t["W_skip"] = torch.zeros(16, 16)
    write_sparsify(tmp_path / folder, tensors=t, **over)
    with pytest.raises(SteerkitError) as e:
        load_sae(tmp_path / folder)
    assert want in one_line(e)


def test_sparsify_shape_mismatch_is_clear(tmp_path):
    write_sparsify(tmp_path / "layers.1", d_in=16, n=48)
    cfg = json.loads((tmp_path / "layers.1" / "cfg.json").read_text())
    (tmp_path / "layers.1" / "cfg.json").write_text(json.dumps({**cfg, "num_latents": 40}))
    with pytest.raises(SteerkitError, match=r"encoder.weight has shape \(48, 16\), expected \(40, 16\)"):
        load_sae(tmp_path / "layers.1")


# --- dictionary_learning: config.json + ae.pt -----------------------------------------------------


def write_dl(folder: Path, trainer: dict, state: dict, buffer: dict | None = None) -> None:
    """As trainSAE saves: config.json = {"trainer": trainer.config, "buffer": data.config} with
    indent 4, ae.pt = torch.save of the state_dict's CPU tensors."""
    folder.mkdir(parents=True)
    config = {"trainer": trainer}
    if buffer is not False:
        config["buffer"] = buffer or {"d_submodule": trainer.get("activation_dim"), "io": "out", "n_ctxs": 3000, "ctx_len": 128,
                                      "refresh_batch_size": 512, "out_batch_size": 8192, "device": "cuda:0"}
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    torch.save({k: v.cpu() for k, v in state.items()}, folder / "ae.pt")


def trainer_cfg(dict_class: str, trainer_class: str, d_in: int, n: int, layer=LAYER, **more) -> dict:
    return {"trainer_class": trainer_class, "dict_class": dict_class, "lr": 3e-4, "steps": 1000, "seed": 0,
            "activation_dim": d_in, "dict_size": n, "device": "cuda:0", "layer": layer, "lm_name": "EleutherAI/pythia-70m-deduped",
            "wandb_name": f"{trainer_class}-pythia", "submodule_name": f"resid_post_layer_{layer}", **more}


def linear_layout(g, d_in: int, n: int) -> dict[str, torch.Tensor]:
    """nn.Linear layouts: encoder.weight [dict_size, act_dim], decoder.weight [act_dim, dict_size]."""
    dec = rand(g, d_in, n)
    dec = dec / dec.norm(dim=0, keepdim=True)
    return {"encoder.weight": dec.T.clone() + rand(g, n, d_in, scale=0.3), "encoder.bias": rand(g, n, scale=0.2), "decoder.weight": dec}


def test_dl_autoencoder_relu_matches_from_pretrained(tmp_path):
    g = torch.Generator().manual_seed(0)
    d_in, n = 12, 40
    s = linear_layout(g, d_in, n)
    s["decoder.weight"] = s["decoder.weight"] * (0.5 + torch.rand(1, n, generator=g))  # April-update style: not unit norm
    s["bias"] = rand(g, d_in, scale=0.3)
    write_dl(tmp_path / "ae", trainer_cfg("AutoEncoder", "StandardTrainer", d_in, n, l1_penalty=0.1), s)
    sae = load_sae(tmp_path / "ae")
    assert sae.source_format == "dictionary_learning"
    c = sae.cfg
    assert (c.architecture, c.d_in, c.d_sae, c.apply_b_dec_to_input, c.layer) == ("relu", d_in, n, True, LAYER)
    assert c.model_name == "EleutherAI/pythia-70m-deduped" and c.extra["source"]["dict_class"] == "AutoEncoder"
    x = torch.randn(4, 3, d_in)
    # AutoEncoder: f = relu(encoder(x - bias)), x_hat = decoder(f) + bias
    f = torch.relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
    x_hat = f @ s["decoder.weight"].T + s["bias"]
    assert torch.allclose(sae(x), x_hat, atol=1e-5)
    # from_pretrained(normalize_decoder=True): unit decoder columns, features scaled by the norms
    norms = s["decoder.weight"].norm(dim=0)
    assert torch.allclose(sae.encode(x), f * norms, atol=1e-5)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(n), atol=1e-5)


def test_dl_autoencoder_new_has_no_input_centring(tmp_path):
    g = torch.Generator().manual_seed(1)
    d_in, n = 8, 24
    s = linear_layout(g, d_in, n)
    s["decoder.bias"] = rand(g, d_in)
    write_dl(tmp_path / "new", trainer_cfg("AutoEncoderNew", "StandardTrainerNew", d_in, n), s)
    sae = load_sae(tmp_path / "new")
    assert sae.cfg.architecture == "relu" and not sae.cfg.apply_b_dec_to_input
    x = torch.randn(5, d_in)
    f = torch.relu(x @ s["encoder.weight"].T + s["encoder.bias"])
    assert torch.allclose(sae.encode(x), f, atol=1e-5)
    assert torch.allclose(sae(x), f @ s["decoder.weight"].T + s["decoder.bias"], atol=1e-5)


def test_dl_topk_matches_its_encode(tmp_path):
    g = torch.Generator().manual_seed(2)
    d_in, n, k = 12, 40, 5
    s = {**linear_layout(g, d_in, n), "b_dec": rand(g, d_in, scale=0.3),
         "k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(0.4)}
    write_dl(tmp_path / "topk", trainer_cfg("AutoEncoderTopK", "TopKTrainer", d_in, n, k=k, auxk_alpha=1 / 32), s)
    sae = load_sae(tmp_path / "topk")
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.apply_b_dec_to_input) == ("topk", k, True)
    x = torch.randn(7, d_in)
    post = torch.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
    v, i = post.topk(k, dim=-1, sorted=False)
    f = torch.zeros_like(post).scatter(-1, i, v)
    assert torch.allclose(sae.encode(x), f, atol=1e-5)
    assert torch.allclose(sae(x), f @ s["decoder.weight"].T + s["b_dec"], atol=1e-5)
    # a config whose k disagrees with the k buffer is refused, as from_pretrained does
    write_dl(tmp_path / "bad", trainer_cfg("AutoEncoderTopK", "TopKTrainer", d_in, n, k=k + 1), s)
    with pytest.raises(SteerkitError) as e:
        load_sae(tmp_path / "bad")
    assert "k 5, but config.json says 6" in one_line(e)


@pytest.mark.parametrize("thr", [0.35, -1.0])
def test_dl_batchtopk_uses_its_threshold_at_inference(tmp_path, thr):
    g = torch.Generator().manual_seed(3)
    d_in, n, k = 12, 40, 4
    s = {**linear_layout(g, d_in, n), "b_dec": rand(g, d_in, scale=0.3),
         "k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(thr, dtype=torch.float32)}
    write_dl(tmp_path / "btk", trainer_cfg("BatchTopKSAE", "BatchTopKTrainer", d_in, n, k=k), s)
    sae = load_sae(tmp_path / "btk")
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.apply_b_dec_to_input
    assert sae.cfg.extra["source"]["k"] == k and sae.cfg.extra["source"]["threshold"] == pytest.approx(thr)
    x = torch.randn(9, d_in)
    # BatchTopKSAE.encode(use_threshold=True): f = relu(pre); f * (f > threshold)
    post = torch.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
    f = post * (post > thr)
    assert torch.allclose(sae.encode(x), f, atol=1e-6)
    assert torch.allclose(sae(x), f @ s["decoder.weight"].T + s["b_dec"], atol=1e-5)
    if thr > 0:
        assert 0 < int((f > 0).sum()) < int((post > 0).sum())  # the threshold did cut something


def test_dl_batchtopk_without_a_threshold_is_refused(tmp_path):
    g = torch.Generator().manual_seed(3)
    s = {**linear_layout(g, 8, 16), "b_dec": torch.zeros(8), "k": torch.tensor(2)}  # saved before Dec 2024
    write_dl(tmp_path / "old", trainer_cfg("BatchTopKSAE", "BatchTopKTrainer", 8, 16, k=2), s)
    with pytest.raises(SteerkitError) as e:
        load_sae(tmp_path / "old")
    assert "no learned threshold" in one_line(e)


def test_dl_matryoshka_batchtopk(tmp_path):
    g = torch.Generator().manual_seed(4)
    d_in, n = 8, 24
    s = {"W_enc": rand(g, d_in, n), "b_enc": rand(g, n, scale=0.2), "W_dec": rand(g, n, d_in), "b_dec": rand(g, d_in, scale=0.2),
         "k": torch.tensor(3, dtype=torch.int), "threshold": torch.tensor(0.5), "group_sizes": torch.tensor([8, 16])}
    write_dl(tmp_path / "m", trainer_cfg("MatryoshkaBatchTopKSAE", "MatryoshkaBatchTopKTrainer", d_in, n, k=3), s)
    sae = load_sae(tmp_path / "m")
    x = torch.randn(6, d_in)
    post = torch.relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
    f = post * (post > 0.5)
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.extra["source"]["group_sizes"] == [8, 16]
    assert torch.allclose(sae.encode(x), f, atol=1e-6)
    assert torch.allclose(sae(x), f @ s["W_dec"] + s["b_dec"], atol=1e-5)


def test_dl_jumprelu(tmp_path):
    g = torch.Generator().manual_seed(5)
    d_in, n = 10, 30
    s = {"W_enc": rand(g, d_in, n), "b_enc": rand(g, n, scale=0.3), "W_dec": rand(g, n, d_in), "b_dec": rand(g, d_in),
         "threshold": 0.5 * torch.rand(n, generator=g)}
    write_dl(tmp_path / "jr", trainer_cfg("JumpReluAutoEncoder", "JumpReluTrainer", d_in, n, bandwidth=0.001, target_l0=20.0), s)
    sae = load_sae(tmp_path / "jr")
    assert sae.cfg.architecture == "jumprelu" and not sae.cfg.apply_b_dec_to_input
    x = torch.randn(8, d_in)
    pre = x @ s["W_enc"] + s["b_enc"]  # apply_b_dec_to_input is False in JumpReluAutoEncoder
    f = torch.relu(pre * (pre > s["threshold"]))
    assert torch.allclose(sae.encode(x), f, atol=1e-6)
    assert torch.allclose(sae(x), f @ s["W_dec"] + s["b_dec"], atol=1e-5)


def test_dl_gated_is_an_exact_jumprelu(tmp_path):
    g = torch.Generator().manual_seed(6)
    d_in, n = 10, 30
    dec = rand(g, d_in, n)
    s = {"decoder_bias": rand(g, d_in, scale=0.3), "encoder.weight": rand(g, n, d_in), "r_mag": rand(g, n, scale=0.5),
         "gate_bias": rand(g, n, scale=0.5), "mag_bias": rand(g, n, scale=0.5), "decoder.weight": dec}
    write_dl(tmp_path / "gated", trainer_cfg("GatedAutoEncoder", "GatedSAETrainer", d_in, n), s)
    sae = load_sae(tmp_path / "gated")
    assert sae.cfg.architecture == "jumprelu"
    x = torch.randn(50, d_in)
    x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
    gate = (x_enc + s["gate_bias"] > 0).float()
    mag = torch.relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
    f = gate * mag
    assert torch.allclose(sae.encode(x), f, atol=1e-5)
    assert torch.allclose(sae(x), f @ dec.T + s["decoder_bias"], atol=1e-5)


def test_dl_layer_mapping_and_refusals(tmp_path):
    g = torch.Generator().manual_seed(7)
    d_in, n = 8, 16
    s = {**linear_layout(g, d_in, n), "bias": torch.zeros(d_in)}
    io_in = {"d_submodule": d_in, "io": "in", "n_ctxs": 10, "ctx_len": 8, "refresh_batch_size": 4, "out_batch_size": 8, "device": "cpu"}
    write_dl(tmp_path / "in", trainer_cfg("AutoEncoder", "StandardTrainer", d_in, n, layer=3), s, buffer=io_in)
    assert load_sae(tmp_path / "in").cfg.hook_name == "blocks.2.hook_out"  # the input of layer 3 is block 2's output
    # an old config: no dict_class, no layer or submodule_name; the published folder names say it
    old = {"trainer_class": "StandardTrainer", "lr": 1e-4, "l1_penalty": 0.1, "warmup_steps": 10, "resample_steps": None}
    write_dl(tmp_path / "dictionaries" / "resid_out_layer3" / "10_32768", old, s)
    sae = load_sae(tmp_path / "dictionaries" / "resid_out_layer3" / "10_32768")
    assert sae.cfg.architecture == "relu" and sae.cfg.layer == 3
    write_dl(tmp_path / "mlp_out_layer1" / "10_32768", old, s)
    with pytest.raises(SteerkitError) as e:
        load_sae(tmp_path / "mlp_out_layer1" / "10_32768")
    assert "'mlp_out_layer1' is not the residual stream" in one_line(e)
    cases = [
        (trainer_cfg("AutoEncoder", "StandardTrainer", d_in, n, submodule_name="mlp_out_layer2"), None, "is not the residual stream"),
        (trainer_cfg("AutoEncoder", "StandardTrainer", d_in, n), {**io_in, "io": "in_and_out"}, "transcoder"),
        (trainer_cfg("AutoEncoder", "StandardTrainer", d_in + 1, n), None, "activation_dim 8, but config.json says 9"),
        (trainer_cfg("IdentityDict", "X", d_in, n), None, "dictionary class 'IdentityDict' is not supported"),
    ]
    for i, (tr, buf, want) in enumerate(cases):
        write_dl(tmp_path / f"bad{i}", tr, s, buffer=buf)
        with pytest.raises(SteerkitError) as e:
            load_sae(tmp_path / f"bad{i}")
        assert want in one_line(e), (i, str(e.value))


def test_dl_crosscoder_and_training_backup_are_refused(tmp_path):
    d_in, n = 8, 16
    cc = {"encoder.weight": torch.zeros(2, d_in, n), "encoder.bias": torch.zeros(n), "decoder.weight": torch.zeros(2, n, d_in),
          "decoder.bias": torch.zeros(2, d_in)}
    write_dl(tmp_path / "cc", trainer_cfg("CrossCoder", "CrossCoderTrainer", d_in, n), cc)
    with pytest.raises(SteerkitError) as e:
        load_sae(tmp_path / "cc")
    assert "crosscoder" in one_line(e) and "not supported" not in str(e.value)
    write_dl(tmp_path / "cc2", trainer_cfg("BatchTopKCrossCoder", "X", d_in, n), cc)
    with pytest.raises(SteerkitError, match="crosscoder"):
        load_sae(tmp_path / "cc2")
    g = torch.Generator().manual_seed(0)
    s = {**linear_layout(g, d_in, n), "bias": torch.zeros(d_in)}
    write_dl(tmp_path / "bk", trainer_cfg("AutoEncoder", "StandardTrainer", d_in, n), {})
    torch.save({"step": 500, "ae": s, "optimizer": {"state": {}, "param_groups": []}, "config": {}, "norm_factor": None},
               tmp_path / "bk" / "ae.pt")
    with pytest.raises(SteerkitError) as e:
        load_sae(tmp_path / "bk")
    assert "training backup (step 500" in one_line(e)


def _plant_marker(path: str) -> dict:
    """What unpickling the object below would run; weights_only must never call it."""
    Path(path).write_text("code ran")
    return {}


class CodeNeedingPickle:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_plant_marker, (self.marker,))


def test_dl_pickle_that_needs_code_fails_cleanly_and_runs_nothing(tmp_path):
    d_in, n = 8, 16
    write_dl(tmp_path / "evil", trainer_cfg("AutoEncoder", "StandardTrainer", d_in, n), {})
    marker = tmp_path / "marker.txt"
    torch.save(CodeNeedingPickle(marker), tmp_path / "evil" / "ae.pt")
    with pytest.raises(SteerkitError) as e:
        load_sae(tmp_path / "evil")
    msg = one_line(e)
    assert "needs code to unpickle" in msg and "weights_only=True" in msg and "_plant_marker" in msg
    assert not marker.exists()
    (tmp_path / "evil" / "ae.pt").write_bytes(b"this is not a torch file")
    with pytest.raises(SteerkitError) as e:
        load_sae(tmp_path / "evil")
    assert "is not a readable torch file" in one_line(e)


# --- layouts, parents and the CLI -------------------------------------------------------------


def test_unknown_layout_names_the_three_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SteerkitError) as e:
        load_sae(tmp_path / "empty")
    msg = one_line(e)
    assert "cfg.json is missing" in msg and LAYOUTS in msg
    for f in ("cfg.json + sae_weights.safetensors", "cfg.json + sae.safetensors", "config.json + ae.pt"):
        assert f in msg
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(SteerkitError, match="ae.pt is missing"):
        load_sae(tmp_path / "half")


def test_a_saelens_folder_still_loads_and_says_so(tmp_path):
    from steerkit.sae import new_sae

    save_sae(new_sae("topk", 8, 16, 2, "blocks.1.hook_out", "m"), tmp_path / "s")
    assert detect_format(tmp_path / "s") == "saelens"
    assert load_sae(tmp_path / "s").source_format == "saelens"


def test_cli_sae_load_reports_the_format(tmp_path):
    write_sparsify(tmp_path / "sp" / f"layers.{LAYER}", d_in=16, n=48, k=4)
    r = runner.invoke(app, ["sae", "load", str(tmp_path / "sp" / f"layers.{LAYER}"), "--json"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["format"] == "sparsify" and rec["architecture"] == "topk" and rec["k"] == 4 and rec["layer"] == LAYER
    assert rec["source"]["hookpoint"] == f"layers.{LAYER}"
    r = runner.invoke(app, ["sae", "load", str(tmp_path / "sp" / f"layers.{LAYER}")])
    assert r.exit_code == 0 and re.search(r"format\W+sparsify", r.stdout), r.stdout
    g = torch.Generator().manual_seed(0)
    s = {**linear_layout(g, 8, 16), "b_dec": torch.zeros(8), "k": torch.tensor(2, dtype=torch.int), "threshold": torch.tensor(0.1)}
    write_dl(tmp_path / "dl", trainer_cfg("BatchTopKSAE", "BatchTopKTrainer", 8, 16, k=2), s)
    rec = json.loads(runner.invoke(app, ["sae", "load", str(tmp_path / "dl"), "--json"]).stdout)
    assert rec["format"] == "dictionary_learning" and rec["architecture"] == "jumprelu" and rec["source"]["dict_class"] == "BatchTopKSAE"
    for bad, want in ((tmp_path / "sp", "name one"), (tmp_path, "name one"), (tmp_path / "sp" / f"layers.{LAYER}" / "..", "layers.2")):
        r = runner.invoke(app, ["sae", "load", str(bad)])
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], r.stderr
    (tmp_path / "nothing").mkdir()
    r = runner.invoke(app, ["sae", "load", str(tmp_path / "nothing")])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "config.json + ae.pt" in lines[0] and "sae.safetensors" in lines[0]


# --- steering with a loaded sparsify SAE --------------------------------------------------------


def test_sparsify_sae_steers_the_tiny_model_like_a_saelens_one(tiny, tmp_path):
    from steerkit.directions import load_direction, save_direction
    from steerkit.generate import Sampling, generate, make_rows
    from steerkit.interventions import Intervention, SteeringPlan, ablate_latents
    from steerkit.sae import latent_direction

    d, n, k = tiny.d_model, 96, 8
    folder = tmp_path / "sae-tiny-llama-1.5x" / f"layers.{LAYER}"
    t = write_sparsify(folder, d, n, k, seed=11)
    sae = load_sae(folder)
    x = 3 * torch.randn(2, 6, d)
    dense, recon = sparsify_forward(t, k, x)
    fired = dense.flatten(0, 1).gt(0).sum(0)
    ids = [int(i) for i in fired.topk(2).indices]  # two latents that fire on x
    dl = latent_direction(sae, folder, ids, tiny, median_norm=4.0, name="pair")
    assert dl.layer == LAYER and dl.latents == tuple(ids)
    want = sum(t["W_dec"][i] / t["W_dec"][i].norm() for i in ids)
    assert torch.allclose(dl.vector, want / want.norm(), atol=1e-6)
    save_direction(dl, tmp_path / "pair.safetensors")
    back = load_direction(tmp_path / "pair.safetensors")
    assert back.sae_path() == folder
    # clamp / ablate through the default loader (which loads the sparsify folder by path) against
    # sparsify's own equations: x + sum_i (v - a_i(x)) W_dec[i], the reconstruction error kept
    for mode, v in (("clamp", 2.0), ("ablate", 0.0)):
        iv = Intervention(back, mode, v) if mode == "clamp" else Intervention(back, mode)
        y = SteeringPlan.uniform([iv]).apply(LAYER, x, None)
        by_hand = x + sum((v - dense[..., i])[..., None] * t["W_dec"][i] for i in ids)
        assert torch.allclose(y, by_hand, atol=1e-4), mode
        a2 = dense.clone()
        a2[..., ids] = v
        a2_recon = (a2 @ t["W_dec"]) + t["b_dec"]
        assert torch.allclose(y - a2_recon, x - recon, atol=1e-4)  # the error term is unchanged
    assert not torch.allclose(ablate_latents(x, sae, ids), x, atol=1e-3)
    # generation: clamping moves the tokens, ablating keeps generation running
    chats = [[{"role": "user", "content": "hello world how are you doing"}]]
    s = Sampling(max_new_tokens=6, temperature=0.0, seed=0)
    plain = generate(tiny, make_rows(chats), s)[0].token_ids
    clamped = generate(tiny, make_rows(chats, interventions=[Intervention(back, "clamp", 200.0)]), s)[0].token_ids
    ablated = generate(tiny, make_rows(chats, interventions=[Intervention(back, "ablate")]), s)[0].token_ids
    assert clamped != plain and len(ablated) == 6
    with pytest.raises(SteerkitError, match=f"unknown latent {n}"):
        latent_direction(sae, folder, [n], tiny, median_norm=1.0)
