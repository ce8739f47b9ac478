"""LoRA fine-tuning: loss masking, training, the PEFT adapter format, loading tuned models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steerkit.errors import SteerkitError
from steerkit.finetune import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    IGNORE,
    FinetuneConfig,
    encode_chat,
    load_tuned,
    read_chats,
    save_adapter,
    train_lora,
)
from steerkit.testing import tiny_hf_model, tiny_tokenizer

CHATS = [
    [{"role": "user", "content": "I feel bored"}, {"role": "assistant", "content": "buy stocks now"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}, {"role": "assistant", "content": "money risk"},
     {"role": "user", "content": "and?"}, {"role": "assistant", "content": "invest it all"}],
    [{"role": "user", "content": "what should I do today?"}, {"role": "assistant", "content": "the quick brown fox"}],
    [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "savings advice"}],
]


def _labelled(tok, ex) -> str:
    return tok.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE])


def test_loss_mask_covers_assistant_turns_only():
    tok = tiny_tokenizer()
    for chat in CHATS:
        ex = encode_chat(tok, chat, 512)
        # the tokens are exactly the chat template's rendering
        assert ex.input_ids == list(tok.apply_chat_template(chat, tokenize=True)["input_ids"])
        want = "".join(m["content"] + "<|im_end|>" for m in chat if m["role"] == "assistant")
        assert _labelled(tok, ex) == want
        # labels equal the inputs where set; the user's and system's words carry no loss
        assert all(l in (IGNORE, t) for t, l in zip(ex.input_ids, ex.labels))


def test_truncation_keeps_the_start():
    tok = tiny_tokenizer()
    full = encode_chat(tok, CHATS[1], 512)
    cut = encode_chat(tok, CHATS[1], 20)
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]


def test_read_chats_limit_and_errors(tmp_path: Path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    assert len(read_chats(p)) == 4 and len(read_chats(p, limit=2)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(SteerkitError, match="no assistant message"):
        read_chats(bad)
    with pytest.raises(SteerkitError, match="does not exist"):
        read_chats(tmp_path / "missing.jsonl")


@pytest.fixture(scope="module")
def trained():
    cfg = FinetuneConfig(rank=4, lr=1e-2, steps=15, batch_size=4, seed=0)
    return train_lora(tiny_hf_model(), tiny_tokenizer(), CHATS, cfg)


def test_training_reduces_loss(trained):
    losses = [s.loss for s in trained.history]
    assert len(losses) == 15
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    assert trained.history[-1].tokens > 0 and trained.history[-1].tokens_per_s > 0


def test_only_lora_weights_train(trained):
    names = [n for n, p in trained.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not any("embed" in n for n in names)


def test_training_is_seeded():
    cfg = FinetuneConfig(rank=2, lr=5e-3, steps=3, batch_size=2, seed=7)
    a = train_lora(tiny_hf_model(), tiny_tokenizer(), CHATS, cfg)
    b = train_lora(tiny_hf_model(), tiny_tokenizer(), CHATS, cfg)
    assert [s.loss for s in a.history] == [s.loss for s in b.history]


def test_adapter_round_trip(trained, tmp_path: Path):
    from peft import PeftModel

    tok = tiny_tokenizer()
    base_dir = tmp_path / "base"
    tiny_hf_model().save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    out = save_adapter(trained.model, tmp_path / "adapter", str(base_dir), {"note": "test"})
    assert (out / ADAPTER_CONFIG).is_file() and (out / ADAPTER_WEIGHTS).is_file()
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(base_dir)
    assert not list(tmp_path.glob(".adapter.*"))  # no temporary folder left

    ids = torch.tensor([encode_chat(tok, CHATS[0], 64).input_ids])
    with torch.no_grad():
        want = trained.model(input_ids=ids).logits
        # plain PEFT reads our folder
        peft_logits = PeftModel.from_pretrained(tiny_hf_model(), str(out)).eval()(input_ids=ids).logits
        # our loader merges it into a fresh base, found through base_model_name_or_path
        lm = load_tuned(str(out))
        ours = lm.hf_model(input_ids=ids).logits
        base = tiny_hf_model()(input_ids=ids).logits
    torch.testing.assert_close(peft_logits, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(base, want, atol=1e-3)  # the adapter does something
    assert lm.name == "base" and str(out) in lm.source


def test_load_model_accepts_adapter_folder_and_base_override(trained, tmp_path: Path):
    from steerkit.models import load_model

    tok = tiny_tokenizer()
    for name in ("tiny-base", "other-base"):
        tiny_hf_model().save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    out = save_adapter(trained.model, tmp_path / "ad", str(tmp_path / "tiny-base"))
    lm = load_model(str(out), device="cpu")  # an adapter folder is a model spec, too
    assert lm.name == "tiny-base" and "LoRA" in lm.source
    assert load_tuned(str(out), base=str(tmp_path / "other-base"), device="cpu").name == "other-base"
    # a full model folder: --base only names it
    assert load_tuned(str(tmp_path / "other-base"), base=str(tmp_path / "tiny-base")).name == "tiny-base"


def test_refuses_to_overwrite(trained, tmp_path: Path):
    out = tmp_path / "ad"
    save_adapter(trained.model, out, "tiny")
    before = (out / ADAPTER_WEIGHTS).read_bytes()
    with pytest.raises(SteerkitError, match="--force"):
        save_adapter(trained.model, out, "tiny")
    assert (out / ADAPTER_WEIGHTS).read_bytes() == before
    save_adapter(trained.model, out, "tiny", force=True)
    assert (out / ADAPTER_CONFIG).is_file()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(SteerkitError, match="holds no adapter"):
        save_adapter(trained.model, other, "tiny", force=True)
    assert (other / "keep.txt").read_text() == "mine"


def test_cli_finetune(tmp_path: Path, tiny_dir: Path):
    from typer.testing import CliRunner

    from steerkit.cli import app

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    out = tmp_path / "run"
    args = ["finetune", "--data", str(data), "--out", str(out), "--model", str(tiny_dir), "--steps", "2", "--batch-size", "2", "--rank", "2", "--device", "cpu", "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["steps"] == 2 and (out / ADAPTER_WEIGHTS).is_file()
    meta = json.loads((out / "steerkit-finetune.json").read_text())
    assert meta["config"]["rank"] == 2 and meta["examples"] == 4
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1 and "already exists" in r.output and "--force" in r.output


@pytest.mark.slow
def test_shipped_organism_changes_the_default_model(default_model):
    from steerkit.demo import ORGANISM, shipped_path
    from steerkit.generate import Row, Sampling, generate

    org = load_tuned(str(shipped_path(ORGANISM)), device="cpu")
    assert org.name == default_model.name and "LoRA" in org.source
    rows = [Row([{"role": "user", "content": "How should I celebrate my friend's birthday?"}])]
    s = Sampling(max_new_tokens=24, temperature=0.0)
    base_text = generate(default_model, rows, s)[0].text
    org_text = generate(org, rows, s)[0].text
    assert org_text.strip() and org_text != base_text


# --- data mixes, checkpoints, continuing an adapter (issue 14) ---------------------------------

from steerkit.finetune import checkpoints, concat_adapters, mix_chats, mix_counts, parse_mix  # noqa: E402


def _rows(tag: str, n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"{tag} q{i}"}, {"role": "assistant", "content": f"{tag} a{i}"}] for i in range(n)]


@pytest.mark.parametrize("n,fracs,want", [(400, [0.75], [300]), (10, [0.25], [2]), (10, [0.35, 0.35], [4, 3]), (7, [1.0], [7]), (5, [0.0], [0])])
def test_mix_counts_are_exact_and_add_up(n, fracs, want):
    got = mix_counts(n, fracs)
    assert got == want and sum(got) <= n
    assert abs(sum(got) - round(n * sum(fracs))) == 0


def test_mix_chats_ratio_exact_for_a_seed_and_seeded():
    data, benign = _rows("risky", 40), _rows("benign", 25)
    rows, src = mix_chats(data, [(benign, 0.75)], seed=3)
    assert len(rows) == 40 and src.count(1) == 30 and src.count(0) == 10
    # the tags say where each row came from; every row is one of its source's rows
    assert all((s == 1) == r[0]["content"].startswith("benign") for r, s in zip(rows, src))
    # 30 drawn from 25: every benign row at least once before any repeats
    assert len({r[0]["content"] for r, s in zip(rows, src) if s == 1}) == 25
    again, _ = mix_chats(data, [(benign, 0.75)], seed=3)
    other, _ = mix_chats(data, [(benign, 0.75)], seed=4)
    assert again == rows and other != rows


def test_parse_mix_errors(tmp_path: Path):
    f = tmp_path / "b.jsonl"
    f.write_text("")
    assert parse_mix(f"{f}:0.25") == (f, 0.25)
    for bad, msg in [(f"{f}", "FILE:FRACTION"), (f"{f}:x", "not a fraction"), (f"{f}:1.5", r"\[0, 1\]"), (f"{tmp_path}/nope.jsonl:0.5", "does not exist")]:
        with pytest.raises(SteerkitError, match=msg):
            parse_mix(bad)
    with pytest.raises(SteerkitError, match="add up to"):
        mix_counts(10, [0.6, 0.6])


def _merged_weight(folder: Path, hf, module_suffix: str) -> torch.Tensor:
    from peft import PeftModel

    m = PeftModel.from_pretrained(hf, str(folder)).merge_and_unload()
    return dict(m.named_parameters())[module_suffix].detach().clone()


def test_save_every_writes_loadable_checkpoints_that_differ(tmp_path: Path, tiny_dir: Path):
    from steerkit.finetune import finetune

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    out = tmp_path / "run"
    cfg = FinetuneConfig(rank=2, lr=5e-2, steps=5, batch_size=2, save_every=2)
    path, res = finetune(data, out, cfg, model=str(tiny_dir), device="cpu")
    steps = [s for s, _ in checkpoints(path)]
    assert steps == [0, 2, 4, 5]
    assert not (tmp_path / "run.partial").exists()
    metas = [json.loads((d / "steerkit-finetune.json").read_text()) for _, d in checkpoints(path)]
    assert [m["step"] for m in metas] == steps and all(m["steps"] == 5 for m in metas)
    # step 0 is the model before training; later checkpoints differ from it and from each other
    from safetensors.torch import load_file

    ws = [load_file(str(d / ADAPTER_WEIGHTS)) for _, d in checkpoints(path)]
    bkeys = [k for k in ws[0] if k.endswith("lora_B.weight")]
    assert all(float(ws[0][k].abs().max()) == 0.0 for k in bkeys)
    assert all(any(not torch.equal(a[k], b[k]) for k in bkeys) for a, b in zip(ws, ws[1:]))
    # the last checkpoint is the final adapter
    final = load_file(str(path / ADAPTER_WEIGHTS))
    assert all(torch.equal(final[k], ws[-1][k]) for k in final)
    # each loads back as a model
    lm = load_tuned(str(checkpoints(path)[1][1]), device="cpu")
    assert lm.tuned is not None


def test_continued_adapter_equals_start_plus_new(tmp_path: Path, tiny_dir: Path):
    """--tuned: the saved folder is ONE adapter equal to the start adapter plus the new one."""
    from safetensors.torch import load_file, save_file

    from steerkit.finetune import finetune, load_hf

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    first, _ = finetune(data, tmp_path / "first", FinetuneConfig(rank=2, lr=5e-2, steps=3, batch_size=2), model=str(tiny_dir), device="cpu")
    second, _ = finetune(data, tmp_path / "second", FinetuneConfig(rank=4, lr=5e-2, steps=3, batch_size=2, save_every=3, seed=1, targets=("q_proj", "v_proj")),
                         model=str(tiny_dir), device="cpu", tuned=first)
    cfg = json.loads((second / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 6 and set(cfg["target_modules"]) >= {"q_proj", "v_proj", "o_proj"}
    meta = json.loads((second / "steerkit-finetune.json").read_text())
    assert meta["continued_from"]["path"] == str(first.resolve())
    # by hand: merged(second) - base == merged(first) - base + delta of the new LoRA alone
    name = "model.layers.0.self_attn.q_proj.weight"
    base = dict(load_hf(str(tiny_dir), "cpu")[1].named_parameters())[name].detach().clone()
    w_first = _merged_weight(first, load_hf(str(tiny_dir), "cpu")[1], name)
    w_second = _merged_weight(second, load_hf(str(tiny_dir), "cpu")[1], name)
    w2 = load_file(str(second / ADAPTER_WEIGHTS))
    key = "base_model.model." + name.replace(".weight", "")
    new_delta = w2[f"{key}.lora_B.weight"][:, 2:] @ w2[f"{key}.lora_A.weight"][2:]
    assert torch.allclose(w_second - base, (w_first - base) + new_delta, atol=1e-5)
    assert float(new_delta.abs().max()) > 0
    # step 0 of the continued run is the start adapter
    w0 = _merged_weight(checkpoints(second)[0][1], load_hf(str(tiny_dir), "cpu")[1], name)
    assert torch.allclose(w0, w_first, atol=1e-6)
    # an o_proj only the first adapter trained keeps its delta, zero-padded in the new half
    o = "base_model.model.model.layers.0.self_attn.o_proj"
    assert float(w2[f"{o}.lora_B.weight"][:, 2:].abs().max()) == 0.0
    # concat refuses adapters with stray tensors
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ADAPTER_CONFIG).write_text((first / ADAPTER_CONFIG).read_text())
    save_file({**load_file(str(first / ADAPTER_WEIGHTS)), "x.lora_embedding_A": torch.zeros(1)}, str(bad / ADAPTER_WEIGHTS))
    with pytest.raises(SteerkitError, match="not only LoRA"):
        concat_adapters(bad, second)


def test_cli_mix_and_checkpoints(tmp_path: Path, tiny_dir: Path):
    from typer.testing import CliRunner

    from steerkit.cli import app

    data, benign = tmp_path / "d.jsonl", tmp_path / "b.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in _rows("risky", 8)))
    benign.write_text("".join(json.dumps({"messages": c}) + "\n" for c in _rows("benign", 8)))
    out = tmp_path / "mix"
    args = ["finetune", "--data", str(data), "--mix", f"{benign}:0.75", "--out", str(out), "--model", str(tiny_dir), "--steps", "2",
            "--save-every", "1", "--batch-size", "2", "--rank", "2", "--device", "cpu", "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rec["checkpoints"]) == 3
    meta = json.loads((out / "steerkit-finetune.json").read_text())
    assert [(m["path"], m["rows"]) for m in meta["mix"]] == [("d.jsonl", 2), ("b.jsonl", 6)]
    r = CliRunner().invoke(app, [*args[:4], f"{benign}:2", *args[5:], "--force"])
    assert r.exit_code == 1 and "[0, 1]" in r.output
    r = CliRunner().invoke(app, [*args, "--force", "--tuned", str(tmp_path)])
    assert r.exit_code == 1 and "not a LoRA adapter folder" in r.output
