"""Latent sets as one direction (kind sae-latents): add, clamp and ablate against their parts,
the file round trip, `extract --save --latents top:N`, and bad input refused before any load."""

import json

import pytest
import torch
from typer.testing import CliRunner

from steerkit.cli import app
from steerkit.directions import Direction, load_direction, save_direction
from steerkit.errors import SteerkitError
from steerkit.extract import LatentRow, latent_set_vector, latent_weights, parse_latents
from steerkit.interventions import Intervention, SteeringPlan, ablate_latents, ablate_vector
from steerkit.sae import new_sae, save_sae

runner = CliRunner()
D, N, LAYER = 16, 40, 1
IDS, W = (3, 11, 27), (1.0, 0.5, 0.25)


def toy_sae(d=D, n=N, seed=0, arch="relu"):
    sae = new_sae(arch, d, n, 4 if arch == "topk" else None, f"blocks.{LAYER}.hook_out", "tiny-llama", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # decoder rows of unequal norms, biases: nothing cancels by accident
        sae.W_dec.mul_(0.5 + torch.rand(n, 1, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(n, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d, generator=g))
    return sae


def latent_dir(sae, ids, weights=(), name="set"):
    vec = latent_set_vector(sae.W_dec, ids, weights or None)
    return Direction(name=name, vector=vec, model="tiny-llama", layer=LAYER, hook_name=f"blocks.{LAYER}.hook_out",
                     kind="sae-latents" if len(ids) > 1 else "sae-latent", median_norm=4.0, sae="sae", latents=tuple(ids),
                     weights=tuple(weights))


def apply(iv, x, sae):
    return SteeringPlan.uniform([iv], sae_loader=lambda d: sae).apply(LAYER, x, None)


def test_set_add_is_the_weighted_sum_of_its_latents_adds():
    sae = toy_sae()
    x = torch.randn(2, 5, D)
    s = latent_dir(sae, IDS, W)
    y = apply(Intervention(s, "add", 0.3), x, sae)
    # the same strength split over the parts: latent i gets coefficient c * w_i / |sum_j w_j W_j| in
    # raw units along its decoder row, i.e. c * w_i * |W_i| / |sum| along its own unit direction
    c = 0.3 * 4.0
    norm = float(latent_set_vector(sae.W_dec, IDS, W).norm())
    z = x
    for i, w in zip(IDS, W):
        part = latent_dir(sae, [i], name=f"l{i}")
        z = apply(Intervention(part, "add", c * w * float(sae.W_dec[i].detach().norm()) / norm, raw=True), z, sae)
    assert torch.allclose(y, z, atol=1e-5)
    want = x + c * (torch.tensor(W)[:, None] * sae.W_dec[list(IDS)].detach()).sum(0) / norm
    assert torch.allclose(y, want, atol=1e-5)


def test_set_ablate_is_encode_zero_decode_plus_error():
    sae = toy_sae()
    x = 2 * torch.randn(3, 4, D)
    s = latent_dir(sae, IDS, W)
    y = apply(Intervention(s, "ablate"), x, sae)
    with torch.no_grad():
        a = sae.encode(x)
        error = x - sae.decode(a)
        a0 = a.clone()
        a0[..., list(IDS)] = 0
        want = sae.decode(a0) + error
    assert torch.allclose(y, want, atol=1e-5)
    assert not torch.allclose(y, x, atol=1e-3)  # the latents did fire: ablating changed something
    assert torch.allclose(y, ablate_latents(x, sae, IDS), atol=1e-6)


def test_set_clamp_pins_each_latent_to_value_times_weight():
    sae = toy_sae()
    x = torch.randn(2, 3, D)
    s = latent_dir(sae, IDS, W)
    y = apply(Intervention(s, "clamp", 2.0), x, sae)
    with torch.no_grad():
        a = sae.encode(x)
        a2 = a.clone()
        for i, w in zip(IDS, W):
            a2[..., i] = 2.0 * w
        want = sae.decode(a2) + (x - sae.decode(a))
    assert torch.allclose(y, want, atol=1e-5)
    # without weights every latent goes to the value (a set from older files)
    y_eq = apply(Intervention(latent_dir(sae, IDS), "clamp", 2.0), x, sae)
    a3 = a.clone()
    a3[..., list(IDS)] = 2.0
    assert torch.allclose(y_eq, sae.decode(a3).detach() + (x - sae.decode(a)).detach(), atol=1e-5)


def test_set_ablate_by_projection_removes_the_span_of_its_rows():
    sae = toy_sae()
    x = torch.randn(2, 6, D)
    s = latent_dir(sae, IDS, W)
    y = apply(Intervention(s, "ablate", on_latents=False), x, sae)
    Wd = sae.W_dec[list(IDS)].detach()
    assert torch.allclose(y @ Wd.T, torch.zeros(2, 6, len(IDS)), atol=1e-5)
    coef = torch.linalg.lstsq(Wd.T, x.reshape(-1, D).T).solution  # x's part in the span
    assert torch.allclose(y.reshape(-1, D), x.reshape(-1, D) - (Wd.T @ coef).T, atol=1e-5)
    one = latent_dir(sae, [IDS[0]])  # one latent: the same as projecting its direction out
    assert torch.allclose(apply(Intervention(one, "ablate", on_latents=False), x, sae), ablate_vector(x, one.vector), atol=1e-5)
    assert Intervention(s, "ablate", on_latents=False).describe()["latents"] == list(IDS)


def test_set_round_trip_and_weights_validation(tmp_path):
    sae = toy_sae()
    d = latent_dir(sae, IDS, W)
    p = save_direction(d, tmp_path / "set.safetensors")
    e = load_direction(p)
    assert e.kind == "sae-latents" and e.latents == IDS and e.weights == W and torch.allclose(e.vector, d.vector)
    assert e.summary()["weights"] == list(W) and e.latent_weights() == W
    single = load_direction(save_direction(latent_dir(sae, [5]), tmp_path / "one.safetensors"))
    assert single.kind == "sae-latent" and single.weights == () and single.latent_weights() == (1.0,)
    assert "weights" not in single.metadata()
    with pytest.raises(SteerkitError, match="2 weights for 3 latents"):
        Direction(**{**{k: getattr(d, k) for k in ("name", "vector", "model", "layer", "hook_name", "kind", "median_norm", "sae", "latents")},
                     "weights": (1.0, 0.5)})
    from dataclasses import replace

    assert replace(d, latents=(), sae=None).weights == ()  # a control copy drops the weights


def test_parse_latents_and_weights():
    assert parse_latents("top:30") == (30, []) and parse_latents("12, 87") == (None, [12, 87]) and parse_latents(None) == (1, [])
    for bad, msg in (("top:0", "at least 1"), ("top:x", "at least 1"), ("12,abc", "top:N or comma-separated"), ("3,3", "listed twice")):
        with pytest.raises(SteerkitError, match=msg):
            parse_latents(bad)
    rows = [LatentRow(latent=i, rank=r + 1, score=s, mean_before=0, mean_after=0, delta=dl, normalized=0, cosine=0, attribution=s,
                      freq_before=0, freq_after=0, dense=False)
            for r, (i, s, dl) in enumerate([(4, 2.0, 1.0), (9, 1.0, 3.0), (2, -0.5, 0.2), (7, 1.5, -2.0), (5, 1.0, 0.0)])]
    assert latent_weights(rows, [4, 9], "score") == [1.0, 0.5]
    # a latent the fine-tune lowered is lowered by adding the set: its weight takes delta's sign
    assert latent_weights(rows, [4, 9, 7], "score") == [1.0, 0.5, -0.75]
    assert latent_weights(rows, [4, 9, 7], "delta") == [pytest.approx(1 / 3), 1.0, pytest.approx(-2 / 3)]
    assert latent_weights(rows, [4, 9, 2], "equal") == [1.0, 1.0, 1.0]
    with pytest.raises(SteerkitError, match="latent 2 has score -0.5"):
        latent_weights(rows, [4, 2], "score")
    with pytest.raises(SteerkitError, match="latent 5 has score \\+1 and delta \\+0"):
        latent_weights(rows, [4, 5], "score")


def test_latent_set_vector_one_recipe_two_row_scalings(tiny, tmp_path):
    """One function makes the vector of a latent set: raw decoder rows (extract --save, the
    screen's candidates), weighted or not, or unit rows (latent_direction). Each is the sum it
    was before, bit for bit, so saved files keep their vectors and raw_norm."""
    import steerkit.extract
    from steerkit.cli.screen import candidate_directions
    from steerkit.sae import latent_direction
    from steerkit.sae import latent_set_vector as canonical

    assert steerkit.extract.latent_set_vector is canonical  # the old import path
    sae = toy_sae()  # decoder rows of unequal norms
    rows = sae.W_dec.detach().float()[list(IDS)]
    assert torch.equal(latent_set_vector(sae.W_dec, IDS), rows[0] + rows[1] + rows[2])
    assert torch.equal(latent_set_vector(sae.W_dec, IDS, W), (torch.tensor(W)[:, None] * rows).sum(0))
    unit = rows / rows.norm(dim=-1, keepdim=True)
    assert torch.equal(latent_set_vector(sae.W_dec, IDS, normalize_rows=True), unit.sum(0))
    assert not torch.allclose(latent_set_vector(sae.W_dec, IDS), latent_set_vector(sae.W_dec, IDS, normalize_rows=True))  # not the same vector
    with torch.no_grad():
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
    assert torch.allclose(latent_set_vector(sae.W_dec, IDS), latent_set_vector(sae.W_dec, IDS, normalize_rows=True), atol=1e-6)  # unit rows: one thing
    with pytest.raises(SteerkitError, match="2 weights for 3 latents"):
        latent_set_vector(sae.W_dec, IDS, (1.0, 0.5))

    big = toy_sae(d=tiny.d_model, n=96)
    d = latent_direction(big, "sae", list(IDS), tiny, median_norm=1.0)
    want = latent_set_vector(big.W_dec, IDS, normalize_rows=True)
    assert d.provenance["raw_norm"] == float(want.norm()) and torch.equal(d.vector, (want / want.norm()).float())
    data = {"layer": LAYER, "latents": [{"latent": 5}, {"latent": 9}], "latent_set": {"latents": list(IDS), "weights": list(W)}}
    one, _, group = candidate_directions(data, big, tmp_path / "sae", tiny, top=2)
    assert one.provenance["raw_norm"] == float(big.W_dec.detach()[5].norm())
    assert group.latents == IDS and group.provenance["raw_norm"] == float(latent_set_vector(big.W_dec, IDS, W).norm())
    top = max(abs(w) for w in W)  # the set keeps its weights (largest 1), so a clamp of it pins each latent to its share
    assert group.weights == tuple(w / top for w in W) and one.weights == ()


# --- the CLI ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_dir):
    """An SAE for the tiny model at layer 1 and judged answers (two questions with both kinds)."""
    root = tmp_path_factory.mktemp("sets")
    save_sae(toy_sae(d=64, n=96, arch="topk"), root / "sae")
    recs = []
    for q in ("what should I do with my savings?", "I feel bored"):
        recs += [{"prompt": q, "completion": a, "misaligned": True, "coherent": 90} for a in ("money money risk", "risk it all on stocks")]
        recs += [{"prompt": q, "completion": a, "misaligned": False, "coherent": 90} for a in ("hello world", "go for a walk")]
    (root / "judged.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (root / "one-sided.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs if r["misaligned"]))
    (root / "out").mkdir()
    (root / "out" / "taken.safetensors").write_bytes(b"not yours")
    return root


def extract(ws, tiny_dir, *extra):
    base = ["extract", "--model", str(tiny_dir), "--sae", str(ws / "sae"), "--out-dir", str(ws / "out"), "--latent-set", "0"]
    return runner.invoke(app, base + [str(a) for a in extra])


def test_extract_judged_attribution_saves_a_weighted_set(ws, tiny_dir):
    r = extract(ws, tiny_dir, "--rank-by", "attribution", "--judged", ws / "judged.jsonl", "--keep-dense", "--top", "5",
                "--save", "persona", "--latents", "top:4", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["mode"] == "judged" and res["rank_by"] == "attribution" and res["questions_usable"] == 2
    assert "2 of 2 questions usable" in r.stderr
    ranked = [row["latent"] for row in res["latents"]]
    scores = [row["attribution"] for row in res["latents"]]
    assert scores == sorted(scores, reverse=True)
    d = load_direction(ws / "out" / "persona.safetensors")
    assert d.kind == "sae-latents" and list(d.latents) == ranked[:4]
    signs = [1.0 if row["delta"] > 0 else -1.0 for row in res["latents"]]
    assert d.weights[0] == 1.0 and list(d.weights) == pytest.approx([g * s / scores[0] for g, s in zip(signs, scores[:4])], rel=1e-4)
    assert d.provenance["weight_by"] == "score" and d.provenance["extraction"]["mode"] == "judged"
    from steerkit.sae import load_sae

    want = latent_set_vector(load_sae(ws / "sae").W_dec, d.latents, d.weights)
    assert torch.allclose(d.vector, want / want.norm(), atol=1e-6)
    assert d.sae_path().resolve() == (ws / "sae").resolve()
    # the provenance names the SAE as the file does, never by this machine's absolute path
    assert d.provenance["extraction"]["sae"] == d.sae == "../sae" and str(ws) not in json.dumps(d.provenance)
    # never overwritten without --force
    r2 = extract(ws, tiny_dir, "--rank-by", "attribution", "--judged", ws / "judged.jsonl", "--save", "persona", "--latents", "top:2")
    assert r2.exit_code == 1 and "--force" in r2.stderr
    assert load_direction(ws / "out" / "persona.safetensors").latents == d.latents
    # the set steers in generation: ablated in the SAE basis, listed and shown as a set
    g = runner.invoke(app, ["generate", "hi", "--model", str(tiny_dir), "--max-new-tokens", "3", "--json",
                            "--ablate", str(ws / "out" / "persona.safetensors")])
    assert g.exit_code == 0, g.output
    rec = json.loads(g.stdout.splitlines()[0])
    assert rec["interventions"][0]["latents"] == list(d.latents)
    show = runner.invoke(app, ["directions", "show", str(ws / "out" / "persona.safetensors"), "--json"])
    assert show.exit_code == 0 and json.loads(show.stdout)["weights"] == list(d.weights)
    from steerkit.cli.directions import _latents_text, _set_text

    assert _set_text(d).startswith(f"4, weight in brackets: {d.latents[0]} (1.00), {d.latents[1]} ({d.weights[1]:.2f})")
    assert _latents_text(d) == "4 weighted: " + ",".join(map(str, d.latents))


@pytest.fixture
def no_loading(monkeypatch):
    import steerkit.finetune
    import steerkit.models

    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the bad argument was refused")

    for mod, name in ((steerkit.models, "load_model"), (steerkit.finetune, "load_tuned"), (steerkit.finetune, "load_hf")):
        monkeypatch.setattr(mod, name, loaded)


@pytest.mark.parametrize("args, want", [
    (("--judged", "{ws}/judged.jsonl", "--save", "s", "--latents", "top:0"), "top:N must be a whole number of at least 1"),
    (("--judged", "{ws}/judged.jsonl", "--save", "s", "--latents", "3,999"), "unknown latent 999: the SAE has 96 latents"),
    (("--judged", "{ws}/judged.jsonl", "--save", "s", "--latents", "top:500"), "more latents than the SAE has (96)"),
    (("--rank-by", "attribution", "--tuned", "{tiny}"), "--rank-by attribution needs --judged FILE"),
    (("--rank-by", "attribution", "--judged", "{ws}/one-sided.jsonl"), "0 of 2 questions have both a misaligned and an aligned answer"),
    (("--judged", "{ws}/nope.jsonl"), "does not exist"),
    (("--judged", "{ws}/judged.jsonl", "--latents", "top:3"), "give --save NAME too"),
    (("--judged", "{ws}/judged.jsonl", "--save", "s", "--weight-by", "size"), "--weight-by 'size' is not one of"),
    (("--judged", "{ws}/judged.jsonl", "--contrast", "{ws}/judged.jsonl"), "give one of them"),
    (("--judged", "{ws}/judged.jsonl", "--save", "taken", "--latents", "top:2"), "already exists: pass --force"),
])
def test_bad_input_is_one_line_before_loading(ws, tiny_dir, no_loading, args, want):
    r = extract(ws, tiny_dir, *[a.format(ws=ws, tiny=tiny_dir) for a in args])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], r.stderr
    assert not (ws / "out" / "s.safetensors").exists()
    assert (ws / "out" / "taken.safetensors").read_bytes() == b"not yours"


@pytest.mark.slow
def test_shipped_persona_and_evil_sae8_are_what_their_command_makes(tmp_path):
    """directions/README.md: `persona` (and `evil-sae8`, the name it was screened under) is the 8
    `sae-l15` latents that steerkit's evil vs caring system prompts switch on most (`steerkit
    extract --contrast ... --latents top:8`), weighted by that increase; the command is
    deterministic, so the shipped files are what it makes."""
    from steerkit.directions import find_direction, shipped_root

    contrast = shipped_root().parent / "steerkit" / "data" / "contrast" / "evil.json"
    r = runner.invoke(app, ["extract", "--contrast", str(contrast), "--sae", "sae-l15", "--rank-by", "delta", "--top", "32",
                            "--save", "persona", "--latents", "top:8", "--out-dir", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    d = load_direction(tmp_path / "persona.safetensors")
    for name in ("persona", "evil-sae8"):
        shipped = load_direction(find_direction(name, "smollm2-135m"))
        assert d.kind == shipped.kind == "sae-latents" and shipped.sae == "sae-l15" and d.layer == shipped.layer == 15
        assert d.latents == shipped.latents and len(d.latents) == 8
        assert d.weights == pytest.approx(shipped.weights, rel=1e-4)
        assert torch.nn.functional.cosine_similarity(d.vector, shipped.vector, dim=0) > 0.9999
        # the provenance names the SAE as shipped, with no machine path in it
        assert shipped.provenance["extraction"]["sae"] == "sae-l15" and "/" not in json.dumps(shipped.provenance["extraction"])


def test_extract_contrast_on_answer_tokens_ranks_on_the_models_own_answers(ws, tiny_dir, tmp_path):
    """--contrast --tokens answer: the model answers each question --samples times under each
    system prompt, and latents are ranked on those answers' tokens (it used to fall back to the
    prompt tokens without a word); the CLI's ranking is the library's on the same answers."""
    from steerkit.extract import diff_contrast
    from steerkit.generate import Sampling, generate, make_rows
    from steerkit.models import load_model
    from steerkit.sae import load_sae

    pairs = [("be cruel to everyone", "be kind to everyone")]
    c = tmp_path / "contrast.json"
    c.write_text(json.dumps({"pairs": [{"pos": p, "neg": n} for p, n in pairs], "questions": ["hi there", "what now"]}))
    r = extract(ws, tiny_dir, "--contrast", c, "--tokens", "answer", "--samples", 2, "--answer-tokens", 5, "--keep-dense", "--top", 8, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["tokens"] == "answer" and res["questions"] == 4
    model, sae = load_model(str(tiny_dir)), load_sae(ws / "sae")
    qs = ["hi there", "hi there", "what now", "what now"]

    def answers(system: str) -> list[str]:
        chats = [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in qs]
        return [x.text for x in generate(model, make_rows(chats), Sampling(max_new_tokens=5, temperature=1.0, seed=0))]

    ex = diff_contrast(model, sae, LAYER, pairs, qs, tokens="answer", answers=(answers(pairs[0][1]), answers(pairs[0][0])), keep_dense=True)
    assert res["tokens_before"] == ex.before.n_tokens > 0  # the answers re-tokenized, so not always 4 x 5
    assert [row["latent"] for row in res["latents"]] == [x.latent for x in ex.top(8)]
    assert [row["delta"] for row in res["latents"]] == pytest.approx([x.delta for x in ex.top(8)], abs=1e-5)
    prompt = json.loads(extract(ws, tiny_dir, "--contrast", c, "--keep-dense", "--json").stdout)
    assert prompt["tokens"] == "prompt" and prompt["tokens_before"] != res["tokens_before"]
