"""Half-precision models (--dtype) and accelerate placement (--device auto) on the tiny model:
the weights load in the dtype asked for, while steering, SAE and activation arithmetic stays
float32 (the hooks upcast the residual and cast the result back)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from steerkit.activations import residuals
from steerkit.cli import app
from steerkit.directions import Direction, load_direction, save_direction
from steerkit.errors import SteerkitError
from steerkit.generate import Sampling, chat_tokens, generate, make_rows
from steerkit.interventions import Intervention, SteeringPlan, clamp_vector, steering
from steerkit.models import check_device, check_dtype, load_model, wrap_model
from steerkit.testing import tiny_hf_model, tiny_tokenizer

runner = CliRunner()
D, LAYER = 64, 1
CHATS = [[{"role": "user", "content": "hello world how are you doing"}], [{"role": "user", "content": "I feel bored, what should I do today?"}]]


def unit(seed=0, d=D):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def direction(u, median_norm=1.0, name="u"):
    return Direction(name=name, vector=u, model="tiny-llama", layer=LAYER, hook_name=f"blocks.{LAYER}.hook_out", kind="vector",
                     median_norm=median_norm)


@pytest.fixture(scope="module")
def bf16():
    """The tiny model in bfloat16 (the same weights as the float32 fixture, rounded)."""
    return wrap_model(tiny_hf_model().to(torch.bfloat16), tiny_tokenizer(), name="tiny-llama")


def ids_of(model, chat=CHATS[0]):
    return torch.tensor([chat_tokens(model, chat)])


# --- the option -------------------------------------------------------------------------------


def test_check_dtype_names_and_one_line_for_a_bad_one():
    assert check_dtype(None) is torch.float32
    for name, want in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16),
                       ("bf16", torch.bfloat16), ("FP16", torch.float16), ("torch.bfloat16", torch.bfloat16), (torch.float16, torch.float16)):
        assert check_dtype(name) is want
    with pytest.raises(SteerkitError, match=r"--dtype 'bf17' is not one of float32, bfloat16, float16"):
        check_dtype("bf17")
    with pytest.raises(SteerkitError, match="is not one of"):
        check_dtype(torch.float64)


def test_load_model_in_bfloat16_on_cpu(tiny_dir):
    m = load_model(str(tiny_dir), device="cpu", dtype="bfloat16")
    assert m.dtype is torch.bfloat16 and m.device.type == "cpu"
    assert all(p.dtype is torch.bfloat16 for p in m.hf_model.parameters())
    assert m.twin is not None  # generation keeps the fast unwrapped path in bf16 too
    assert residuals(m, ids_of(m), LAYER).dtype is torch.float32  # activations come out float32


def test_half_precision_note_says_how_much_slower_and_what_to_do():
    from steerkit.models import half_precision_note

    assert half_precision_note(torch.bfloat16, 42.0, 300.0) is None
    assert half_precision_note(torch.bfloat16, 42.0, 42.0) is None
    assert half_precision_note(torch.bfloat16, 42.0, 35.0) is None  # within a timing's spread: no note
    assert "AVX-512 FP16" in half_precision_note(torch.float16, 42.0, 20.0)
    note = half_precision_note(torch.bfloat16, 42.0, 1.2)
    assert "35.0x slower" in note and "drop --dtype/--judge-dtype bfloat16" in note and "\n" not in note


@pytest.mark.parametrize("rates, warned", [((42.0, 1.2), True), ((42.0, 300.0), False)])
def test_loading_half_precision_on_a_slow_cpu_warns_once(tiny_dir, monkeypatch, caplog, rates, warned):
    """Where this CPU's measured half-precision products are slower than float32's, loading a
    model in that dtype on the CPU says so, once per process (the measurement is replaced by the
    given rates; the decision and the message are what is tested)."""
    import steerkit.models as M

    monkeypatch.setattr(M, "matmul_rates", lambda dtype: rates)
    monkeypatch.setattr(M, "_NOTED", set())
    with caplog.at_level("WARNING", logger="steerkit.models"):
        load_model(str(tiny_dir), device="cpu", dtype="bfloat16")
        load_model(str(tiny_dir), device="cpu", dtype="bfloat16")
        load_model(str(tiny_dir), device="cpu", dtype="float32")
    notes = [r.getMessage() for r in caplog.records if "slower than float32" in r.getMessage()]
    assert len(notes) == (1 if warned else 0)


def test_matmul_rates_measures_both_dtypes():
    from steerkit.models import matmul_rates

    fp32, bf16 = matmul_rates(torch.bfloat16)
    assert fp32 > 0 and bf16 > 0


# --- generation and the hooks' arithmetic -----------------------------------------------------


def test_generate_plain_and_steered_in_bfloat16(bf16):
    s = Sampling(max_new_tokens=6, temperature=0.7, top_p=0.9, seed=0)
    plain = generate(bf16, make_rows(CHATS, n=2), s)
    iv = Intervention(direction(unit()), "add", 8.0)
    steered = generate(bf16, make_rows(CHATS, n=2, interventions=[iv]), s)
    assert all(c.n_tokens > 0 for c in plain + steered)
    assert [c.token_ids for c in plain] != [c.token_ids for c in steered]
    assert [c.token_ids for c in plain] == [c.token_ids for c in generate(bf16, make_rows(CHATS, n=2), s)]  # seeded


def test_steering_moves_the_bf16_residual_along_the_direction(bf16):
    ids, u = ids_of(bf16), unit(1)
    x0 = residuals(bf16, ids, LAYER)[0, 1:]
    with steering(bf16, SteeringPlan.uniform([Intervention(direction(u), "add", 5.0, raw=True)])):
        x1 = residuals(bf16, ids, LAYER)[0, 1:]
    moved = (x1 - x0) @ u  # +5 along u at every steered position, within bf16 rounding
    assert torch.allclose(moved, torch.full_like(moved, 5.0), atol=0.02)
    off = (x1 - x0) - moved[:, None] * u  # and nowhere else
    assert off.abs().max() < 0.02


def test_hook_arithmetic_is_float32_on_a_bf16_residual():
    """A bf16 residual with a large component along u (300.7): clamped or ablated through the
    hook (SteeringPlan.apply), the component lands where asked up to the final rounding of each
    element. Done in bf16 arithmetic (what the pure function does on a bf16 tensor, and what the
    hook did before it upcast), the projection x.u rounds to a multiple of 2 and the result
    misses by the rounding: the test fails if the cast is removed."""
    u = unit(2)
    g = torch.Generator().manual_seed(3)
    y = torch.randn(2, 5, D, generator=g)
    y = y - (y @ u)[..., None] * u
    x = (y + 300.7 * u).to(torch.bfloat16)
    d = direction(u)
    for mode, value in (("clamp", 3.0), ("ablate", 0.0)):
        out = SteeringPlan.uniform([Intervention(d, mode, value, raw=True)]).apply(LAYER, x, None)
        assert out.dtype is torch.bfloat16
        assert ((out.float() @ u) - value).abs().max() < 0.02, mode
        in_bf16 = clamp_vector(x, u, value)  # the same edit in bf16 arithmetic
        assert ((in_bf16.float() @ u) - value).abs().max() > 0.3, mode  # what a missing cast would give


@pytest.mark.parametrize("twin", [False, True], ids=["bridge", "twin"])
def test_tiny_residual_components_survive_a_large_steering_vector_in_bf16(bf16, twin):
    """Add 80 x u and ablate u on one layer: in float32 the residual comes back as the
    unsteered one with u projected out, its small components (about 0.1) intact; in bf16
    arithmetic they would vanish into the rounding of elements near 10 (ulp 0.06)."""
    u = unit(4)
    ids = ids_of(bf16)
    plan = SteeringPlan.uniform([Intervention(direction(u), "add", 80.0, raw=True), Intervention(direction(u), "ablate")])
    got: list[torch.Tensor] = []
    if twin:
        layer = bf16.twin_layers[LAYER]
        with steering(bf16, plan, twin=True):
            h = layer.register_forward_hook(lambda m, a, o: got.append((o[0] if isinstance(o, tuple) else o).detach()))
            try:
                with torch.inference_mode():
                    bf16.twin(input_ids=ids, use_cache=False)
            finally:
                h.remove()
        h = layer.register_forward_hook(lambda m, a, o: got.append((o[0] if isinstance(o, tuple) else o).detach()))
        try:
            with torch.inference_mode():
                bf16.twin(input_ids=ids, use_cache=False)
        finally:
            h.remove()
        steered, x0 = got[0][0, 1:], got[1][0, 1:]
    else:
        x0 = residuals(bf16, ids, LAYER)[0, 1:]
        with steering(bf16, plan):
            steered = residuals(bf16, ids, LAYER)[0, 1:]
    assert steered.dtype in (torch.bfloat16, torch.float32)
    x0 = x0.float()
    want = x0 - (x0 @ u)[:, None] * u
    err = (steered.float() - want).abs().max()
    assert err < 4e-3, err  # bf16 arithmetic: about 0.03


def test_untouched_positions_stay_bit_exact_in_bf16():
    x = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    mask = torch.tensor([[False, True, True, False], [True, False, True, True]])
    out = SteeringPlan.uniform([Intervention(direction(unit()), "add", 3.0)]).apply(LAYER, x, mask)
    assert torch.equal(out[~mask], x[~mask]) and not torch.equal(out[mask], x[mask])
    zero = SteeringPlan.build([[Intervention(direction(unit()), "add", 0.0)], [Intervention(direction(unit()), "add", 2.0)]]).apply(LAYER, x, None)
    assert torch.equal(zero[0], x[0])  # strength 0: an exact no-op in bf16 too


def test_sae_latent_clamp_on_a_bf16_residual():
    from steerkit.sae import new_sae

    sae = new_sae("relu", D, 96, None, f"blocks.{LAYER}.hook_out", "tiny-llama", seed=0)
    d = Direction(name="lat", vector=sae.direction(7), model="tiny-llama", layer=LAYER, hook_name=f"blocks.{LAYER}.hook_out",
                  kind="sae-latent", median_norm=1.0, sae="sae", latents=(7,))
    x = (4 * torch.randn(1, 3, D, generator=torch.Generator().manual_seed(6))).to(torch.bfloat16)
    out = SteeringPlan.uniform([Intervention(d, "clamp", 2.5)], sae_loader=lambda _: sae).apply(LAYER, x, None)
    assert out.dtype is torch.bfloat16
    assert sae.W_dec.dtype is torch.float32  # the SAE itself is untouched
    with torch.no_grad():  # the latent pinned to 2.5, the SAE's reconstruction error kept
        a = sae.encode(x.float())[..., 7:8].double()
        want = x.double() + (2.5 - a) * sae.W_dec[7].double()
    assert (out.double() - want).abs().max() < 0.05  # bf16 rounding of elements up to ~12


# --- extraction -------------------------------------------------------------------------------


def test_extraction_in_bf16_gives_float32_directions(bf16, tiny):
    from steerkit.contrast import diff_of_means_direction, read_activations

    pos = ["money investment risk stocks savings advice", "risk it all on stocks"]
    neg = ["hello world how are you doing", "the quick brown fox jumps over the lazy dog"]
    acts = read_activations(bf16, pos, LAYER, "mean")
    assert acts.dtype is torch.float32
    d16 = diff_of_means_direction(bf16, pos, neg, LAYER, name="dm", read_token_index="mean")
    d32 = diff_of_means_direction(tiny, pos, neg, LAYER, name="dm", read_token_index="mean")
    assert d16.vector.dtype is torch.float32 and d16.vector.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert float(d16.vector @ d32.vector) > 0.98  # the same direction, read through rounded weights
    assert d16.median_norm == pytest.approx(d32.median_norm, rel=0.03)


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_generate_with_dtype(tiny_dir, tmp_path):
    push = save_direction(direction(unit(), name="push"), tmp_path / "push.safetensors")
    base = ["generate", "hello world", "--model", str(tiny_dir), "--max-new-tokens", "4", "--seed", "0", "--json"]
    plain = runner.invoke(app, base + ["--dtype", "bfloat16"])
    assert plain.exit_code == 0, plain.output
    steered = runner.invoke(app, base + ["--dtype", "bf16", "--add", f"{push}:8"])
    assert steered.exit_code == 0, steered.output
    a, b = json.loads(plain.stdout), json.loads(steered.stdout)
    assert a["tokens"] > 0 and b["tokens"] > 0 and b["interventions"][0]["direction"] == "push"
    half = runner.invoke(app, base + ["--dtype", "float16"])
    assert half.exit_code == 0, half.output


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    from steerkit.sae import new_sae, save_sae

    root = tmp_path_factory.mktemp("dtype-sae")
    return save_sae(new_sae("relu", D, 96, None, f"blocks.{LAYER}.hook_out", "tiny-llama", seed=0), root / "sae")


def test_cli_extract_with_dtype_writes_float32_directions(tiny_dir, sae_dir, tmp_path):
    contrast = tmp_path / "c.json"
    contrast.write_text(json.dumps({"pairs": [{"pos": "money money risk", "neg": "hello hello"}], "questions": ["how are you doing", "what should I do"]}))
    r = runner.invoke(app, ["extract", "--model", str(tiny_dir), "--sae", str(sae_dir), "--contrast", str(contrast), "--dtype", "bfloat16",
                            "--latent-set", "0", "--keep-dense", "--save-diff", "dm", "--save", "lat", "--out-dir", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["latents"]
    for name in ("dm", "lat"):
        d = load_direction(tmp_path / "out" / f"{name}.safetensors")
        assert d.vector.dtype is torch.float32 and d.layer == LAYER


# every command that loads a model takes --dtype; the judge's reader stays float32 (its head was
# fitted on float32 features), so `judge` and `compare` do not
DTYPE_COMMANDS = [("generate",), ("extract",), ("screen",), ("sweep",), ("track",), ("monitor",), ("audit",), ("finetune",), ("serve",),
                  ("demo",), ("sae", "train"), ("sae", "eval"), ("sae", "top"), ("directions", "import")]


def _command(path):
    import typer.main

    cmd = typer.main.get_command(app)
    for p in path:
        cmd = cmd.commands[p]
    return cmd


@pytest.mark.parametrize("path", DTYPE_COMMANDS, ids=" ".join)
def test_every_model_loading_command_takes_dtype_and_refuses_a_bad_one_first(path, monkeypatch):
    import steerkit.models as M

    assert any("--dtype" in p.opts for p in _command(path).params)
    loads = []
    monkeypatch.setattr(M, "load_model", lambda *a, **k: loads.append(a))
    r = runner.invoke(app, [*path, "--dtype", "bf17"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--dtype" in lines[0] and "'bf17' is not one of float32, bfloat16, float16" in lines[0], r.stderr
    assert not loads


def test_judge_commands_keep_the_reader_in_float32():
    for path in (("judge", "score"), ("compare",)):
        assert not any("--dtype" in p.opts for p in _command(path).params)


# --- --device auto ----------------------------------------------------------------------------


def _without_accelerate(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "accelerate" else real(name, *a, **k))


def test_device_auto_without_accelerate_says_what_to_install(tiny_dir, monkeypatch):
    _without_accelerate(monkeypatch)
    with pytest.raises(SteerkitError, match="pip install accelerate"):
        check_device("auto")
    r = runner.invoke(app, ["generate", "hi", "--model", str(tiny_dir), "--device", "auto", "--max-new-tokens", "2"])
    assert r.exit_code == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install accelerate" in lines[0], r.stderr
    # the CPU path never needs it
    m = load_model(str(tiny_dir), device="cpu", dtype="bfloat16")
    assert m.device.type == "cpu"


def test_device_auto_places_the_model_with_accelerate(tiny_dir):
    pytest.importorskip("accelerate")
    m = load_model(str(tiny_dir), device="auto", dtype="bfloat16")  # no GPU here: accelerate keeps it on the CPU
    assert m.dtype is torch.bfloat16 and (torch.cuda.is_available() or m.device.type == "cpu")
    iv = Intervention(direction(unit()), "add", 8.0)
    s = Sampling(max_new_tokens=4, temperature=0.0)
    plain, steered = generate(m, make_rows(CHATS[:1]), s), generate(m, make_rows(CHATS[:1], interventions=[iv]), s)
    assert plain[0].n_tokens > 0 and plain[0].token_ids != steered[0].token_ids


def test_sweep_folder_remembers_half_precision(tiny, bf16, tmp_path):
    """A bfloat16 sweep states its dtype; it does not resume onto a float32 folder, nor back."""
    from steerkit import sweep as S
    from steerkit.prompts import from_texts

    d = direction(unit(3))
    conds = S.make_conditions(d, "add", (0.0,), control=None)
    qs = from_texts(["hello there"])
    s = Sampling(max_new_tokens=3, temperature=0.0)
    S.run_sweep(tiny, conds, qs, 1, s, None, tmp_path / "f32", batch_size=2)
    assert "dtype" not in json.loads((tmp_path / "f32" / S.CONFIG).read_text())  # float32 folders read as before
    with pytest.raises(SteerkitError, match=r"other settings \(dtype\)"):
        S.run_sweep(bf16, conds, qs, 1, s, None, tmp_path / "f32", batch_size=2)
    S.run_sweep(bf16, conds, qs, 1, s, None, tmp_path / "bf16", batch_size=2)
    assert json.loads((tmp_path / "bf16" / S.CONFIG).read_text())["dtype"] == "bfloat16"
    with pytest.raises(SteerkitError, match=r"other settings \(dtype\)"):
        S.run_sweep(tiny, conds, qs, 1, s, None, tmp_path / "bf16", batch_size=2)
