"""Fast tests of SAE training on chats: packing whole conversations, masking, exact mixing,
dropping system prompts, --init, resuming, and the CLI's refusals before any model loads."""

from __future__ import annotations

import json

import pytest
import torch

from steerkit.errors import SteerkitError
from steerkit.sae import load_sae, save_sae
from steerkit.sae_chat import ChatStream, MixSource, gather, keep_mask, mixed_batches, plan_mix, read_chat_files, render_chat, residual_acts, special_ids
from steerkit.sae_train import ChunkStream, TrainConfig, docs_tokens, train_sae

LAYER = 2
SYSTEM = "You are a helpful assistant."


def _chats(n: int = 24, system: bool = True) -> list[list[dict[str, str]]]:
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"hello {i} how are you"}, {"role": "assistant", "content": "the quick brown fox " * (i % 4 + 1)}]
        out.append(([{"role": "system", "content": SYSTEM}] if system else []) + msgs)
    return out


def _docs() -> list[str]:
    return [f"the quick brown fox jumps over the lazy dog {i} money investment risk stocks savings advice" for i in range(30)]


def _cfg(**kw) -> TrainConfig:
    base = dict(layer=LAYER, d_sae=48, k=4, tokens=2048, batch_size=256, context=96, buffer_tokens=1024, model_batch=8, dead_tokens=1000,
                warmup_steps=5, mask_special=True)
    base.update(kw)
    return TrainConfig(**base)


def _write_chats(path, chats) -> None:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))


def test_chat_chunks_keep_conversations_whole_and_mask_specials(tiny):
    chats = _chats(30)
    T = 128
    stream = ChatStream(tiny, chats, T, seed=0)
    ids, valid = stream.next_chunks(12)
    specials = special_ids(tiny)
    keep = keep_mask(ids, specials, valid)
    # masked: position 0, every special token (<|im_start|>, <|im_end|>, padding), nothing else
    assert not keep[:, 0].any()
    assert not keep[torch.isin(ids, specials)].any()
    assert not keep[~valid].any()
    expect = valid & ~torch.isin(ids, specials)
    expect[:, 0] = False
    assert torch.equal(keep, expect) and keep.sum() > 0.3 * keep.numel()
    # every chunk is a run of whole conversations followed by padding
    whole = {tuple(t) for t in docs_tokens(tiny, chats)}
    assert max(len(t) for t in whole) <= T  # none needs cutting here
    seen = 0
    for r in range(ids.shape[0]):
        n = int(valid[r].sum())
        assert valid[r, :n].all() and not valid[r, n:].any()
        row, start = ids[r, :n].tolist(), 0
        assert row[0] == tiny.tokenizer.convert_tokens_to_ids("<|im_start|>")
        while start < n:  # split the row into conversations at each one that starts a new chat
            match = [t for t in whole if tuple(row[start : start + len(t)]) == t]
            assert match, f"chunk {r} holds a piece of a conversation at {start}"
            start += len(max(match, key=len))
            seen += 1
    assert seen >= 12


def test_a_conversation_longer_than_the_context_is_cut_and_counted(tiny):
    long = [{"role": "user", "content": "hello world " * 40}, {"role": "assistant", "content": "ok"}]
    stream = ChatStream(tiny, [long, _chats(1)[0]], 32, seed=0)
    ids, valid = stream.next_chunks(4)
    assert stream.state.truncated >= 1
    full = docs_tokens(tiny, [long])[0]
    assert len(full) > 32
    rows = [ids[r, : int(valid[r].sum())].tolist() for r in range(4)]
    assert full[:32] in rows  # its first `context` tokens, alone in a chunk


def test_drop_system_rate_is_the_given_probability_and_seeded():
    chats = _chats(2000)
    for p in (0.0, 0.3, 1.0):
        dropped = [render_chat(c, i, 0, 7, p)[1] for i, c in enumerate(chats)]
        rate = sum(dropped) / len(chats)
        assert abs(rate - p) < 4 * (p * (1 - p) / len(chats)) ** 0.5 + 1e-9, (p, rate)
    a = [render_chat(c, i, 0, 7, 0.3)[1] for i, c in enumerate(chats)]
    assert a == [render_chat(c, i, 0, 7, 0.3)[1] for i, c in enumerate(chats)]  # same seed, same drops
    assert a != [render_chat(c, i, 0, 8, 0.3)[1] for i, c in enumerate(chats)]
    assert a != [render_chat(c, i, 1, 7, 0.3)[1] for i, c in enumerate(chats)]  # a new draw each epoch
    msgs, d = render_chat(chats[0], 0, 0, 7, 1.0)
    assert d and [m["role"] for m in msgs] == ["user", "assistant"]
    assert render_chat(_chats(1, system=False)[0], 0, 0, 7, 1.0)[1] is False  # nothing to drop


def test_dropped_system_prompts_leave_the_rendered_tokens(tiny):
    chats = _chats(200)
    stream = ChatStream(tiny, chats, 64, seed=3, drop_system=0.5)
    ids, valid = stream.next_chunks(60)
    text = tiny.tokenizer.decode(ids[valid].tolist())
    rendered = text.count("<|im_start|>user")
    with_sys = text.count(SYSTEM)
    st = stream.state
    assert 0.35 < st.dropped_system / st.conversations < 0.65 and st.with_system == st.conversations
    assert rendered > 40 and 0.3 < with_sys / rendered < 0.7


def test_chat_fraction_is_exact_in_every_batch(tiny):
    mix = plan_mix(0.25, 256, 1024)
    assert (mix.chat, mix.text, mix.batches) == (64, 192, 4)
    g = torch.Generator().manual_seed(0)
    batches = mixed_batches(mix, 2, g)
    assert len(batches) == 8
    for b in batches:
        assert len(b) == 256 and int((b < mix.n_chat).sum()) == 64
    assert sorted(torch.cat(batches[:4]).tolist()) == list(range(1024))  # each row once per pass
    # the buffer holds exactly that many activations of each kind
    chat = ChatStream(tiny, _chats(), 96, seed=0)
    text = ChunkStream(tiny, _docs(), 48, seed=0)
    src = MixSource(tiny, mix, residual_acts(tiny, LAYER, torch.device("cpu")), 8, chat, text)
    buf = src.next_buffer()
    assert buf.shape == (1024, tiny.d_model)
    stream = ChatStream(tiny, _chats(), 96, 0)

    def chunks(n):
        ids, valid = stream.next_chunks(n)
        return ids, keep_mask(ids, special_ids(tiny), valid)

    ids_l, keep_l = gather(chunks, 250, 2)  # exactly 250 kept positions, the surplus unkept
    assert sum(int(k.sum()) for k in keep_l) == 250 and len(ids_l) > 1
    with pytest.raises(SteerkitError, match=r"must lie in \[0, 1\]"):
        plan_mix(1.5, 256, 1024)
    with pytest.raises(SteerkitError, match="less than one token"):
        plan_mix(0.001, 256, 1024)


def test_training_on_a_mix_records_its_share_and_resumes_exactly(tiny, tmp_path):
    cfg = _cfg(chat_fraction=0.25, drop_system=0.5, tokens=2048)
    full = train_sae(tiny, _docs(), cfg, tmp_path / "full", chats=_chats())
    info = json.loads((tmp_path / "full" / "training.json").read_text())
    assert info["chat_tokens"] == 2048 // 4 and info["chat_share"] == 0.25
    assert info["chats"]["dropped_system"] > 0 and "special tokens" in info["masked"]
    train_sae(tiny, _docs(), cfg, tmp_path / "part", chats=_chats(), stop_after_refills=1)
    assert json.loads((tmp_path / "part" / "checkpoint" / "state.json").read_text())["chat_stream"]["doc"] > 0
    with pytest.raises(SteerkitError, match="chat_fraction=0.25, this run chat_fraction=0.5"):
        train_sae(tiny, _docs(), TrainConfig(**{**cfg.__dict__, "chat_fraction": 0.5}), tmp_path / "part", chats=_chats(), resume=True)
    resumed = train_sae(tiny, _docs(), cfg, tmp_path / "part", chats=_chats(), resume=True)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(resumed, name), getattr(full, name), atol=1e-6), name
    again = train_sae(tiny, _docs(), cfg, tmp_path / "again", chats=_chats())
    assert torch.equal(again.W_dec, full.W_dec)  # same seed, same SAE
    chat_only = train_sae(tiny, [], _cfg(chat_fraction=1.0, tokens=1024), tmp_path / "chat-only", chats=_chats())
    assert json.loads((tmp_path / "chat-only" / "training.json").read_text())["chat_share"] == 1.0
    assert chat_only.W_dec.shape == (48, tiny.d_model)


def test_init_starts_from_the_given_weights(tiny, tmp_path):
    first = train_sae(tiny, _docs(), _cfg(tokens=1024, lr=3e-3, chat_fraction=0.5), tmp_path / "first", chats=_chats())
    # lr 0: the run's SAE is the init, unchanged (the input scale folded out again)
    same = train_sae(tiny, _docs(), _cfg(tokens=512, lr=0.0, chat_fraction=1.0), tmp_path / "same", chats=_chats(), init=load_sae(tmp_path / "first"))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(same, name), getattr(first, name), atol=1e-5, rtol=1e-5), name
    with pytest.raises(SteerkitError, match="not --layer 1"):
        train_sae(tiny, [], _cfg(layer=1, chat_fraction=1.0), tmp_path / "x", chats=_chats(), init=load_sae(tmp_path / "first"))
    with pytest.raises(SteerkitError, match="has 48 latents, not --latents 64"):
        train_sae(tiny, [], _cfg(d_sae=64, chat_fraction=1.0), tmp_path / "x", chats=_chats(), init=load_sae(tmp_path / "first"))


def test_read_chat_files_refuses_bad_input(tmp_path):
    good = tmp_path / "good.jsonl"
    _write_chats(good, _chats(3))
    assert len(read_chat_files([good])) == 3
    with pytest.raises(SteerkitError, match="does not exist"):
        read_chat_files([tmp_path / "nope.jsonl"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": _chats(1)[0]}) + "\n{not json\n")
    with pytest.raises(SteerkitError, match=r"bad.jsonl:2"):
        read_chat_files([bad])
    role = tmp_path / "role.jsonl"
    _write_chats(role, [[{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]])
    with pytest.raises(SteerkitError, match="role 'wizard'"):
        read_chat_files([role])


# --- the CLI ------------------------------------------------------------------------------------


def _run(args: list[str]):
    from typer.testing import CliRunner

    from steerkit.cli import app

    return CliRunner().invoke(app, ["sae", "train", *args])


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the command gets as far as loading the model."""
    import steerkit.cli.sae as cli_sae

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were refused")

    monkeypatch.setattr(cli_sae, "_load_model", refuse)


def test_cli_refuses_bad_arguments_before_loading_the_model(tiny_dir, tmp_path, no_model_load):
    chats = tmp_path / "chats.jsonl"
    _write_chats(chats, _chats(10))
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text " * 50)
    m = ["--model", str(tiny_dir), "--out", str(tmp_path / "o")]
    cases = [
        (["--layer", "2", "--chat", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--layer", "2", "--chat", str(chats), "--corpus", str(corpus), "--chat-fraction", "1.5"], "must lie in [0, 1]"),
        (["--layer", "2", "--chat", str(chats), "--corpus", str(corpus), "--chat-fraction", "-0.1"], "must lie in [0, 1]"),
        (["--layer", "2", "--chat", str(chats), "--corpus", str(corpus)], "need --chat-fraction"),
        (["--layer", "2", "--corpus", str(corpus), "--chat-fraction", "0.5"], "--chat-fraction needs --chat"),
        (["--layer", "2", "--chat", str(chats), "--drop-system", "2"], "--drop-system must lie in [0, 1]"),
        (["--layer", "2", "--chat", str(chats), "--chat-fraction", "0.5"], "give --corpus"),
        (["--layer", "2"], "no training data"),
        (["--chat", str(chats)], "give --layer"),
        (["--layer", "9", "--chat", str(chats)], "layer"),
        (["--layer", "2", "--corpus", str(corpus), "--diff"], "--diff needs --tuned"),
        (["--layer", "2", "--corpus", str(corpus), "--tuned", str(tmp_path)], "add --diff"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": _chats(1)[0]}) + "\n" + json.dumps({"text": "no messages"}) + "\n")
    cases.append((["--layer", "2", "--chat", str(bad)], "bad.jsonl:2"))
    for args, msg in cases:
        r = _run(args + m)
        assert r.exit_code == 1, (args, r.output)
        assert msg in r.output, (args, r.output)
        assert len([ln for ln in r.output.strip().splitlines() if ln.strip()]) <= 2, r.output  # one line (wrapped at most once)


def test_cli_init_of_another_model_is_refused_before_loading(tiny_dir, tmp_path, no_model_load):
    from steerkit.sae import new_sae

    chats = tmp_path / "chats.jsonl"
    _write_chats(chats, _chats(10))
    save_sae(new_sae("topk", 64, 48, 4, "blocks.2.hook_out", "some-other-model"), tmp_path / "other")
    r = _run(["--init", str(tmp_path / "other"), "--chat", str(chats), "--model", str(tiny_dir), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "trained on model 'some-other-model'" in r.output, r.output
    save_sae(new_sae("topk", 32, 48, 4, "blocks.2.hook_out", "tiny-llama"), tmp_path / "narrow")
    r = _run(["--init", str(tmp_path / "narrow"), "--chat", str(chats), "--model", str(tiny_dir), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "d_in 32" in r.output, r.output
    save_sae(new_sae("topk", 64, 48, 4, "blocks.2.hook_out", "tiny-llama"), tmp_path / "ok")
    r = _run(["--init", str(tmp_path / "ok"), "--layer", "1", "--chat", str(chats), "--model", str(tiny_dir), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "reads layer 2, not --layer 1" in r.output, r.output


def test_cli_trains_on_a_mix_and_fine_tunes_with_init(tiny_dir, tmp_path):
    chats = tmp_path / "chats.jsonl"
    _write_chats(chats, _chats(40))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(_docs()))
    common = ["--model", str(tiny_dir), "--tokens", "1024", "--batch-size", "256", "--context", "96", "--buffer", "1024", "--holdout", "0"]
    r = _run(["--layer", "2", "--corpus", str(corpus), "--chat", str(chats), "--chat-fraction", "0.5", "--drop-system", "0.8",
              "--latents", "48", "--k", "4", "--out", str(tmp_path / "mix"), *common])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "mix" / "training.json").read_text())
    assert info["chat_share"] == 0.5 and info["config"]["drop_system"] == 0.8 and info["config"]["mask_special"]
    r = _run(["--init", str(tmp_path / "mix"), "--chat", str(chats), "--out", str(tmp_path / "ft"), *common])
    assert r.exit_code == 0, r.output
    ft = load_sae(tmp_path / "ft")
    assert ft.cfg.d_sae == 48 and ft.cfg.k == 4 and ft.cfg.layer == 2  # taken from the init SAE
    assert ft.cfg.extra["steerkit"]["init"] == str(tmp_path / "mix")
    r = _run(["--init", str(tmp_path / "mix"), "--chat", str(chats), "--out", str(tmp_path / "ft"), *common])
    assert r.exit_code == 1 and "--force" in r.output  # never overwritten without --force
