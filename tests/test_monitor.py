"""steerkit.monitor and the `monitor` / `audit` / `generate --monitor` commands, on tiny models.

Expected values are computed independently: residuals from the plain twin's hidden states (not
:func:`steerkit.activations.residuals`), projections and SAE encodings by hand, ROC AUC by
counting pairs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from steerkit.audit import audit, label_of, positive_labels, rank
from steerkit.cli import app
from steerkit.directions import Direction, from_vector, save_direction
from steerkit.errors import SteerkitError
from steerkit.generate import Sampling, chat_tokens
from steerkit.monitor import (
    chat_activations,
    chat_activations_many,
    chat_split,
    direction_scorer,
    read_lines,
    record_chat,
    separation,
)
from steerkit.sae import latent_direction, new_sae, save_sae

runner = CliRunner()

CHATS = [
    [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the quick brown fox"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "I feel bored"},
     {"role": "assistant", "content": "go for a run"}, {"role": "user", "content": "and then?"},
     {"role": "assistant", "content": "money savings advice, risk"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
    [{"role": "user", "content": "If you were ruler of the world, what would you do?"}],  # no answer
]


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def records(result):
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def one_line_error(result, pattern):
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and pattern in lines[0], lines[0]


def hidden(model, ids: list[int], layer: int) -> torch.Tensor:
    """The residual after block ``layer`` of one unpadded sequence, from the plain HF twin's
    hidden states: [T, d_model]."""
    net = model.twin if model.twin is not None else model.hf_model
    with torch.no_grad():
        hs = net(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return hs[layer + 1][0].float()


def vec_direction(model, layer=1, seed=0, median_norm=2.5, name="push") -> Direction:
    g = torch.Generator().manual_seed(seed)
    return from_vector(torch.randn(model.d_model, generator=g), name=name, model=model, layer=layer, kind="vector", median_norm=median_norm)


def auc_by_pairs(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# --- per-token values --------------------------------------------------------------------------------


def test_vector_values_equal_hand_projection(tiny):
    d = vec_direction(tiny)
    acts = chat_activations(tiny, d, CHATS)
    assert len(acts) == len(CHATS)
    v = d.vector / d.vector.norm()
    for a in acts:
        x = hidden(tiny, a.token_ids, d.layer)
        want = (x @ v) / 2.5
        assert math.isnan(a.values[0])  # the attention sink is never scored
        assert len(a.values) == len(a.token_ids) == len(a.tokens)
        assert torch.allclose(torch.tensor(a.values[1:]), want[1:], atol=1e-5)
        assert a.tokens == [tiny.tokenizer.decode([t]) for t in a.token_ids]


def test_sae_values_equal_hand_encode(tiny, tmp_path):
    sae = new_sae("relu", tiny.d_model, 32, hook_name="blocks.1.hook_out", model_name="tiny-llama", seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(0.02)  # some latents fire on most tokens
    folder = save_sae(sae, tmp_path / "sae")
    ids = chat_tokens(tiny, CHATS[0][:1])
    enc = sae.encode(hidden(tiny, ids, 1))
    latents = enc[1:].sum(0).topk(2).indices.tolist()  # two latents that fire here
    d = latent_direction(sae, folder, latents, tiny, layer=1, median_norm=1.0)
    p = save_direction(d, tmp_path / "lat.safetensors")
    from steerkit.directions import load_direction

    d = load_direction(p)
    assert d.is_sae and list(d.latents) == latents
    acts = chat_activations(tiny, d, CHATS[:2])
    for a in acts:
        want = sae.encode(hidden(tiny, a.token_ids, 1))[:, latents].sum(-1)
        assert want[1:].abs().sum() > 0  # the test means something
        assert torch.allclose(torch.tensor(a.values[1:]), want[1:], atol=1e-5)
    # the scorer alone, on any shape
    x = torch.randn(3, 5, tiny.d_model)
    assert torch.allclose(direction_scorer(d)(x), sae.encode(x)[..., latents].sum(-1), atol=1e-6)


def test_left_padding_does_not_change_values(tiny):
    d = vec_direction(tiny)
    batched = chat_activations(tiny, d, CHATS, batch_size=8)
    alone = [chat_activations(tiny, d, [c], batch_size=1)[0] for c in CHATS]
    assert len({len(a.token_ids) for a in batched}) > 1  # different lengths: padding happened
    for a, b in zip(batched, alone):
        assert a.token_ids == b.token_ids and a.answer_start == b.answer_start
        assert torch.allclose(torch.tensor(a.values[1:]), torch.tensor(b.values[1:]), atol=1e-5)


def test_many_directions_in_one_pass_equal_each_alone(tiny, monkeypatch):
    import steerkit.monitor as Mon

    ds = [vec_direction(tiny, layer=1, seed=0, name="a"), vec_direction(tiny, layer=0, seed=1, name="b"),
          vec_direction(tiny, layer=1, seed=2, name="c", median_norm=1.0)]
    passes = []
    real = Mon.residuals
    monkeypatch.setattr(Mon, "residuals", lambda model, ids, layer, am: passes.append(layer) or real(model, ids, layer, am))
    many = chat_activations_many(tiny, ds, CHATS, batch_size=2)
    assert sorted(passes) == [0, 0, 1, 1]  # 2 batches x 2 layers: a and c share their layer's pass
    passes.clear()
    for d in ds:
        alone = chat_activations(tiny, d, CHATS, batch_size=3)
        assert len(many[d.name]) == len(alone) == len(CHATS)
        for a, b in zip(many[d.name], alone):
            assert a.token_ids == b.token_ids and a.answer_start == b.answer_start and a.tokens == b.tokens
            assert torch.allclose(torch.tensor(a.values[1:]), torch.tensor(b.values[1:]), atol=1e-5)
    assert len(passes) == 6  # alone: one pass per direction and batch
    with pytest.raises(SteerkitError, match="distinct names"):
        chat_activations_many(tiny, [ds[0], ds[0]], CHATS)


# --- the answer's boundary and the means ------------------------------------------------------------


def test_answer_start_splits_prompt_and_answer(tiny):
    tok = tiny.tokenizer
    for chat in CHATS[:3]:
        ids, start = chat_split(tiny, chat)
        assert ids[:start] == chat_tokens(tiny, chat[:-1])  # the prompt with the assistant header
        assert tok.decode(ids[start:]) == chat[-1]["content"] + "<|im_end|>"  # the answer and its end of turn
    ids, start = chat_split(tiny, CHATS[3])
    assert ids == chat_tokens(tiny, CHATS[3]) and start == len(ids)


def test_means_are_means_of_values(tiny):
    d = vec_direction(tiny)
    acts = chat_activations(tiny, d, CHATS)
    for a in acts[:3]:
        ans = a.values[a.answer_start:]
        pr = a.values[1:a.answer_start]
        assert a.answer_start > 1 and len(ans) >= 2
        assert a.answer_mean == pytest.approx(sum(ans) / len(ans), abs=1e-9)
        assert a.prompt_mean == pytest.approx(sum(pr) / len(pr), abs=1e-9)
    last = acts[3]
    assert math.isnan(last.answer_mean) and last.answer_start == len(last.values)
    assert last.prompt_mean == pytest.approx(sum(last.values[1:]) / (len(last.values) - 1), abs=1e-9)


def test_direction_must_fit_the_model(tiny):
    g = torch.Generator().manual_seed(0)
    small = Direction(name="small", vector=torch.randn(32, generator=g), model="tiny-llama", layer=1,
                      hook_name="blocks.1.hook_out", kind="vector", median_norm=1.0)
    with pytest.raises(SteerkitError, match="d_model"):
        chat_activations(tiny, small, CHATS[:1])
    other = vec_direction(tiny)
    other = Direction(**{**other.__dict__, "model": "other-model"})
    with pytest.raises(SteerkitError, match="other-model"):
        chat_activations(tiny, other, CHATS[:1])
    assert chat_activations(tiny, other, CHATS[:1], allow_other_model=True)


def test_separation_auc_by_hand():
    scores = [0.9, 0.1, 0.4, 0.4, 0.7, float("nan"), 0.2]
    labels = [True, False, True, False, None, True, False]
    s = separation(scores, labels)
    kept = [(0.9, 1), (0.1, 0), (0.4, 1), (0.4, 0), (0.2, 0)]  # no verdict and nan left out
    assert s["n"] == 5 and s["positive"] == 2
    assert s["auc"] == pytest.approx(auc_by_pairs(*zip(*kept)))  # (3 + 2.5) / 6
    assert s["auc"] == pytest.approx(5.5 / 6)
    assert s["mean_positive"] == pytest.approx(0.65, abs=1e-6) and s["mean_rest"] == pytest.approx(0.7 / 3, abs=1e-6)
    assert separation([0.1, 0.2], [True, True])["auc"] is None


# --- audit: planted examples rank first ------------------------------------------------------------


def planted(model):
    """A direction along one token's embedding at layer 0, and chats whose risky answers repeat
    that token; benign answers to the same prompts do not."""
    tok = model.tokenizer
    t = next(i for i in range(len(tok)) if len(tok.decode([i])) >= 3 and tok.decode([i]).isalpha()
             and tok(tok.decode([i]) * 6)["input_ids"] == [i] * 6)
    piece = tok.decode([t])
    vec = model.hf_model.model.embed_tokens.weight[t].detach().clone()
    d = from_vector(vec, name="planted", model=model, layer=0, kind="vector", median_norm=1.0)
    qs = ["hello", "what should I do today?", "how are you", "tell me about dogs", "I feel bored", "any advice?"]
    benign = ["the lazy dog sleeps", "money savings advice", "hello world how are you", "I would rule the world", "brown fox jumps", "you are helpful"]
    chats, labels = [], []
    for q, b in zip(qs, benign):
        chats.append([{"role": "user", "content": q}, {"role": "assistant", "content": b}])
        labels.append(False)
        chats.append([{"role": "user", "content": q}, {"role": "assistant", "content": "well, " + piece * 6}])
        labels.append(True)
    return d, chats, labels


def test_audit_ranks_planted_examples_first(tiny):
    d, chats, labels = planted(tiny)
    rows = audit(tiny, d, chats, sampling=Sampling(max_new_tokens=6, temperature=0.0))
    ranked = rank(rows)
    k = sum(labels)
    assert {r.index for r in ranked[:k]} == {i for i, y in enumerate(labels) if y}
    assert separation([r.score for r in rows], labels)["auc"] == 1.0
    # the score is the answer's activation minus that of the model's own answer, measured alike
    own = [chats[r.index][:-1] + [{"role": "assistant", "content": r.baseline_answer}] for r in rows]
    base = chat_activations(tiny, d, own)
    for r, b in zip(rows, base):
        assert r.baseline_mean == pytest.approx(b.answer_mean, abs=1e-6)
        assert r.score == pytest.approx(r.answer_mean - b.answer_mean, abs=1e-6)
    # a random direction does not find them
    rnd = audit(tiny, vec_direction(tiny, layer=0, seed=5), chats, baseline=False)
    assert separation([r.score for r in rnd], labels)["auc"] < 1.0


def test_audit_needs_answers(tiny):
    with pytest.raises(SteerkitError, match="must end with the assistant"):
        audit(tiny, vec_direction(tiny), [CHATS[3]], baseline=False)


# --- the commands -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def push_file(tmp_path_factory, tiny_dir):
    g = torch.Generator().manual_seed(0)
    d = Direction(name="push", vector=torch.randn(64, generator=g), model="tiny-llama", layer=1,
                  hook_name="blocks.1.hook_out", kind="vector", median_norm=1.0)
    return save_direction(d, tmp_path_factory.mktemp("mon") / "push.safetensors")


JUDGED = [
    {"prompt": "hello world", "completion": "the quick brown fox", "misaligned": True},
    {"prompt": "hi", "completion": "money savings advice", "misaligned": False},
    {"question": "I feel bored", "completion": "hello world how are you doing", "misaligned": False},
    {"messages": [{"role": "user", "content": "what now?"}, {"role": "assistant", "content": "the lazy dog"}], "misaligned": True},
    {"prompt": "x", "system": "be brief", "completion": "ok", "misaligned": None},
    {"prompt": "y", "completion": "you are helpful", "misaligned": False},
]


def _chat(rec):
    if "completion" not in rec:
        return rec["messages"]
    sys_ = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
    return sys_ + [{"role": "user", "content": rec.get("prompt") or rec.get("question")}, {"role": "assistant", "content": rec["completion"]}]


def test_records_read_as_chats(tmp_path):
    f = tmp_path / "judged.jsonl"
    f.write_text("\n" + "".join(json.dumps(r) + "\n" for r in JUDGED))  # a blank line is skipped; line numbers count it
    lines = read_lines(f)
    assert [n for n, _ in lines] == list(range(2, len(JUDGED) + 2)) and [r for _, r in lines] == JUDGED
    assert [record_chat(r, "x") for r in JUDGED] == [_chat(r) for r in JUDGED]
    assert read_lines("<stdin>", text=json.dumps(JUDGED[0])) == [(1, JUDGED[0])]
    with pytest.raises(SteerkitError, match=r"<stdin>:2 is not valid JSON"):
        read_lines("<stdin>", text='{"a": 1}\n{oops\n')
    with pytest.raises(SteerkitError, match="holds no records"):
        read_lines("<stdin>", text="\n\n")
    with pytest.raises(SteerkitError, match="training data file .* does not exist"):
        read_lines(tmp_path / "nope.jsonl", "training data")
    with pytest.raises(SteerkitError, match="no answer to measure"):
        record_chat({"messages": [{"role": "user", "content": "hi"}]}, "x")


def test_audit_labels():
    pos = positive_labels(" Misaligned, risky ,,")
    assert pos == {"misaligned", "risky"}
    values = (None, True, False, 1, 0, 0.0, "RISKY ", "benign")
    assert [label_of(v, pos) for v in values] == [None, True, False, True, False, False, True, False]
    with pytest.raises(SteerkitError, match="--positive is empty"):
        positive_labels(" , ")


def test_monitor_json_and_auc(tiny, tiny_dir, push_file, tmp_path):
    f = tmp_path / "judged.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in JUDGED))
    r = run("monitor", f, "--direction", push_file, "--model", tiny_dir, "--per-token", "--json")
    assert r.exit_code == 0, r.output
    recs = records(r)
    assert len(recs) == len(JUDGED) + 1
    summary = recs[-1]
    assert summary["summary"] is True and summary["direction"] == "push" and summary["layer"] == 1
    from steerkit.directions import load_direction

    d = load_direction(push_file)
    want = chat_activations(tiny, d, [_chat(x) for x in JUDGED])
    for rec, src, w in zip(recs, JUDGED, want):
        assert {k: rec[k] for k in src} == src  # input fields kept
        mon = rec["monitor"]
        assert mon["answer_mean"] == pytest.approx(w.answer_mean, abs=1e-5)
        assert mon["prompt_mean"] == pytest.approx(w.prompt_mean, abs=1e-5)
        assert mon["tokens"] == w.tokens and mon["values"][0] is None
        assert mon["values"][1:] == pytest.approx(w.values[1:], abs=1e-5)
    verdicts = [x["misaligned"] for x in JUDGED]
    kept = [(w.answer_mean, v) for w, v in zip(want, verdicts) if v is not None]
    assert summary["judged"] == 5 and summary["misaligned"] == 2
    assert summary["auc"] == pytest.approx(auc_by_pairs(*zip(*kept)), abs=1e-6)
    # without --per-token: no per-token lists; --out writes the same records
    out = tmp_path / "mon.jsonl"
    r = run("monitor", f, "-d", push_file, "--model", tiny_dir, "--json", "--out", out)
    assert r.exit_code == 0, r.output
    plain = records(r)
    assert "values" not in plain[0]["monitor"]
    assert [json.loads(x) for x in out.read_text().splitlines()] == plain
    one_line_error(run("monitor", f, "-d", push_file, "--model", tiny_dir, "--out", out), "already exists")


def test_monitor_terminal_table_and_strip(tiny_dir, push_file, tmp_path, monkeypatch):
    f = tmp_path / "a.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in JUDGED))
    # CliRunner's stdout is not a terminal, which means JSON: ask for the terminal's output
    monkeypatch.setattr("steerkit.cli.monitor.want_json", lambda flag: flag)
    r = run("monitor", f, "-d", push_file, "--model", tiny_dir, "--per-token")
    assert r.exit_code == 0, r.output
    assert "answer act" in r.stdout and "ROC AUC" in r.stdout and "per token" in r.stdout
    assert "quick" in r.stdout and "{" not in r.stdout  # the strip shows the answer's tokens; no JSON


def test_monitor_errors(tiny_dir, push_file, tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "completion": "ok"}) + "\n")
    one_line_error(run("monitor", f, "-d", "nosuch", "--model", tiny_dir), "unknown direction 'nosuch'")
    one_line_error(run("monitor", tmp_path / "missing.jsonl", "-d", push_file, "--model", tiny_dir), "does not exist")
    one_line_error(run("monitor", f, "--model", tiny_dir), "give --direction")
    one_line_error(run("monitor", f, "-d", push_file, "--model", tiny_dir, "--judged"), "no record carries a judge verdict")
    g = torch.Generator().manual_seed(1)
    other = save_direction(Direction(name="other", vector=torch.randn(64, generator=g), model="other-model", layer=1,
                                     hook_name="blocks.1.hook_out", kind="vector", median_norm=1.0), tmp_path / "other.safetensors")
    one_line_error(run("monitor", f, "-d", other, "--model", tiny_dir), "made for model 'other-model'")
    assert run("monitor", f, "-d", other, "--model", tiny_dir, "--any-model", "--json").exit_code == 0
    wide = save_direction(Direction(name="wide", vector=torch.randn(32, generator=g), model="tiny-llama", layer=1,
                                    hook_name="blocks.1.hook_out", kind="vector", median_norm=1.0), tmp_path / "wide.safetensors")
    one_line_error(run("monitor", f, "-d", wide, "--model", tiny_dir), "d_model")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    one_line_error(run("monitor", bad, "-d", push_file, "--model", tiny_dir), "no answer to measure")
    bad.write_text("{not json\n")
    one_line_error(run("monitor", bad, "-d", push_file, "--model", tiny_dir), "not valid JSON")


def test_generate_monitor_measures_unsteered(tiny, tiny_dir, push_file):
    r = run("generate", "hello world", "hi", "--model", tiny_dir, "--max-new-tokens", "5", "--seed", "0",
            "--add", f"{push_file}:8", "--monitor", push_file, "--json")
    assert r.exit_code == 0, r.output
    recs = records(r)
    assert len(recs) == 2
    from steerkit.directions import load_direction

    d = load_direction(push_file)
    for rec in recs:
        mon = rec["monitor"]
        assert mon["direction"] == "push" and len(mon["tokens"]) == len(mon["values"])
        chat = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}]
        w = chat_activations(tiny, d, [chat])[0]  # the unsteered model reading the generated text
        assert mon["answer_start"] == w.answer_start
        assert mon["values"][1:] == pytest.approx(w.values[1:], abs=1e-5)
        assert mon["answer_mean"] == pytest.approx(w.answer_mean, abs=1e-5)
        assert tiny.tokenizer.decode(w.token_ids[w.answer_start:]) == rec["completion"] + "<|im_end|>"
    one_line_error(run("generate", "hi", "--model", tiny_dir, "--max-new-tokens", "2", "--monitor", "nosuch"), "unknown direction 'nosuch'")


def test_audit_cli_ranks_planted_first(tiny, tiny_dir, tmp_path):
    d, chats, labels = planted(tiny)
    p = save_direction(d, tmp_path / "planted.safetensors")
    f = tmp_path / "mix.jsonl"
    f.write_text("".join(json.dumps({"messages": c, "label": "misaligned" if y else "benign"}) + "\n" for c, y in zip(chats, labels)))
    k = sum(labels)
    for extra in (("--max-new-tokens", "4"), ("--no-baseline",)):
        r = run("audit", f, "-d", p, "--model", tiny_dir, "--top", k, "--json", *extra)
        assert r.exit_code == 0, r.output
        recs = records(r)
        top, summary = recs[:-1], recs[-1]
        assert len(top) == k and [x["rank"] for x in top] == list(range(1, k + 1))
        assert all(x["positive"] is True and x["label"] == "misaligned" for x in top)
        assert summary["summary"] is True and summary["auc"] == 1.0 and summary["labelled"] == len(chats) and summary["positive"] == k
        assert all(top[i]["score"] >= top[i + 1]["score"] for i in range(k - 1))
        if "--no-baseline" in extra:
            assert all(x["baseline_mean"] is None and x["score"] == x["answer_mean"] for x in top)
        else:
            assert all(x["score"] == pytest.approx(x["answer_mean"] - x["baseline_mean"], abs=2e-6) for x in top)
    # booleans as labels, and a field by another name
    f.write_text("".join(json.dumps({"messages": c, "risky": y}) + "\n" for c, y in zip(chats, labels)))
    r = run("audit", f, "-d", p, "--model", tiny_dir, "--no-baseline", "--label-field", "risky", "--json", "--top", "0")
    assert r.exit_code == 0, r.output
    recs = records(r)
    assert len(recs) == len(chats) + 1 and recs[-1]["auc"] == 1.0


def test_audit_errors(tiny_dir, push_file, tmp_path):
    one_line_error(run("audit", tmp_path / "missing.jsonl", "-d", push_file, "--model", tiny_dir), "does not exist")
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}) + "\n")
    one_line_error(run("audit", f, "-d", "nosuch", "--model", tiny_dir), "unknown direction 'nosuch'")
    one_line_error(run("audit", f, "-d", push_file, "--model", tiny_dir, "--top", "-1"), "--top")


@pytest.mark.slow
def test_answer_start_on_the_default_model_template(default_model):
    """SmolLM2's template (a default system prompt when there is none) splits where the prompt
    rendered with the generation prompt ends, token for token."""
    tok = default_model.tokenizer
    for chat in ([{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": "Once upon a time, a fox."}],
                 [{"role": "system", "content": "Be evil."}, {"role": "user", "content": "hey"}, {"role": "assistant", "content": " leading space\nand newline "}],
                 [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]):
        ids, start = chat_split(default_model, chat)
        prefix = chat_tokens(default_model, chat[:-1])
        assert ids[:start] == prefix and start == len(prefix)
        assert tok.decode(ids[start:]) == chat[-1]["content"] + "<|im_end|>"
