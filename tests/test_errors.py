"""Every bad input is one clear line, before any work is done (issue 16).

A table of bad command lines run through Typer's CliRunner: each must exit 1 (2 for a malformed
command line) with exactly one line on stderr that names the bad value and the fix, no
traceback, no file created or changed, and no model (or judge) loaded: the loaders are replaced
by ones that fail the test if called. A few cases run as real subprocesses (what a terminal
shows, warnings), and the server answers malformed requests with 4xx OpenAI-style errors.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from steerkit.cli import app
from steerkit.directions import Direction, save_direction

runner = CliRunner()
STEERKIT = Path(sys.executable).parent / "steerkit"


class _Payload:
    """Unpickling this creates a file: proof that a payload ran."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _direction(path: Path, d_model: int = 64, layer: int = 1, model: str = "tiny-llama", name: str = "push") -> Path:
    g = torch.Generator().manual_seed(0)
    d = Direction(name=name, vector=torch.randn(d_model, generator=g), model=model, layer=layer,
                  hook_name=f"blocks.{layer}.hook_out", kind="vector", median_norm=1.0)
    return save_direction(d, path)


def _safetensors(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(4)}, str(path))


def _adapter_config(folder: Path, base: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base, "r": 2,
                                                            "lora_alpha": 4, "target_modules": ["q_proj"]}))


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_dir):
    """A folder of made-up bad inputs (read-only fixtures for every case)."""
    w = tmp_path_factory.mktemp("bad")
    (w / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (w / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    (w / "q.yaml").write_bytes(b"- id: q\n  paraphrases: ['caf\xe9']\n")
    (w / "surrogate.jsonl").write_text('{"prompt": "x \\ud800 y"}\n')
    (w / "empty.jsonl").write_text('{"prompt": ""}\n')
    (w / "answers.jsonl").write_text(json.dumps({"prompt": "hi", "completion": "hello"}) + "\n")
    (w / "answers-surrogate.jsonl").write_text('{"prompt": "hi", "completion": "x \\udc80"}\n')
    (w / "afile").write_text("a file, not a folder\n")
    (w / "somefolder").mkdir()
    (w / "somefolder.safetensors").mkdir()
    (w / "existing.jsonl").write_text("keep me\n")
    _direction(w / "push.safetensors")
    _direction(w / "wide.safetensors", d_model=32, model="other-model", name="wide")
    _direction(w / "deep.safetensors", layer=10, name="deep")
    # model folders: pickled and truncated weights, neither model nor adapter
    for name in ("tiny-pickle", "tiny-trunc"):
        shutil.copytree(tiny_dir, w / name)
    from safetensors.torch import load_file

    sd = load_file(str(tiny_dir / "model.safetensors"))
    (w / "tiny-pickle" / "model.safetensors").unlink()
    torch.save(sd, w / "tiny-pickle" / "pytorch_model.bin")
    data = (w / "tiny-trunc" / "model.safetensors").read_bytes()
    (w / "tiny-trunc" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (w / "neither").mkdir()
    (w / "neither" / "notes.txt").write_text("no model here\n")
    # adapters: truncated, pickled (with a payload), base unknown
    _adapter_config(w / "ad-trunc", str(tiny_dir))
    _safetensors(w / "ad-trunc" / "adapter_model.safetensors")
    data = (w / "ad-trunc" / "adapter_model.safetensors").read_bytes()
    (w / "ad-trunc" / "adapter_model.safetensors").write_bytes(data[:20])
    _adapter_config(w / "ad-pickle", str(tiny_dir))
    (w / "ad-pickle" / "adapter_model.bin").write_bytes(pickle.dumps({"w": _Payload(w / "PWNED-adapter")}))
    _adapter_config(w / "ad-unknown", "x")
    _safetensors(w / "ad-unknown" / "adapter_model.safetensors")
    # vectors for `directions import`: a payload, an object array, junk
    torch.save({"v": _Payload(w / "PWNED-pt")}, w / "evil.pt")
    import numpy as np

    np.save(w / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    torch.save(torch.randn(64), w / "v.pt")
    # sweep folders for `sweep summarize`
    (w / "sweep-bad-line").mkdir()
    (w / "sweep-bad-line" / "results.jsonl").write_text('{"broken\n{"condition": "x"}\n')
    (w / "sweep-not-record").mkdir()
    (w / "sweep-not-record" / "results.jsonl").write_text('{"condition": "x"}\n{"condition": "y"}\n')
    (w / "sweep-bad-config").mkdir()
    (w / "sweep-bad-config" / "sweep.json").write_text("{not json")
    (w / "sweep-bad-config" / "results.jsonl").write_text("")
    (w / "home").mkdir()
    return w


@pytest.fixture(scope="module")
def ro(ws):
    """A folder nothing can be written into: a chmod 555 folder, or /sys for root."""
    if os.geteuid() != 0:
        d = ws / "ro"
        d.mkdir(exist_ok=True)
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    import tempfile

    try:
        fd, p = tempfile.mkstemp(dir="/sys")
    except OSError:
        yield Path("/sys")
        return
    os.close(fd)
    os.unlink(p)
    pytest.skip("running as root with no read-only folder to try")


def _snapshot(*roots: Path) -> dict[str, object]:
    snap: dict[str, object] = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            snap[str(p)] = "dir" if p.is_dir() else p.read_bytes()
    return snap


@pytest.fixture
def no_loading(monkeypatch, ws):
    """Every model and judge loader fails the test if reached; run from inside ``ws``."""
    import steerkit.finetune
    import steerkit.judge
    import steerkit.models

    def loaded(*a, **k):
        raise AssertionError("a model or judge was loaded before the bad argument was refused")

    for mod, name in ((steerkit.models, "load_model"), (steerkit.finetune, "load_tuned"), (steerkit.finetune, "load_hf"),
                      (steerkit.judge, "load_judge")):
        monkeypatch.setattr(mod, name, loaded)
    monkeypatch.setenv("STEERKIT_HOME", str(ws / "home"))
    monkeypatch.delenv("STEERKIT_DEBUG", raising=False)
    monkeypatch.chdir(ws)


GEN = ("generate", "hi", "--model", "{tiny}", "--max-new-tokens", "2")
SWEEP = ("sweep", "--direction", "{ws}/push.safetensors", "--model", "{tiny}", "--samples", "1", "--strengths", "0,0.5", "--judge", "none")

# (name, args, stdin, exit code, substrings of the one error line)
CASES = [
    # text that is not valid UTF-8, or holds a lone surrogate
    ("binary prompt file", ("generate", "-f", "{ws}/binary.bin", "--model", "{tiny}"), None, 1, ["binary.bin", "binary file", "UTF-8"]),
    ("latin-1 prompt file", ("generate", "-f", "{ws}/latin1.txt", "--model", "{tiny}"), None, 1, ["latin1.txt", "0xe9", "save it as UTF-8"]),
    ("latin-1 question yaml", ("generate", "-f", "{ws}/q.yaml", "--model", "{tiny}"), None, 1, ["q.yaml", "not UTF-8"]),
    ("lone surrogate in jsonl", ("generate", "-f", "{ws}/surrogate.jsonl", "--model", "{tiny}"), None, 1, ["surrogate.jsonl:1", "\\ud800", "fix"]),
    ("invalid bytes on stdin", ("generate", "--model", "{tiny}"), b"fine\nab\xff\xfe\n", 1, ["<stdin>", "0xff", "UTF-8"]),
    ("judge a binary file", ("judge", "score", "{ws}/binary.bin"), None, 1, ["binary.bin", "UTF-8"]),
    ("judge invalid stdin", ("judge", "score", "-"), b'{"prompt": "\xff"}\n', 1, ["<stdin>", "UTF-8"]),
    ("judge a lone surrogate", ("judge", "score", "{ws}/answers-surrogate.jsonl"), None, 1, ["answers-surrogate.jsonl:1", "\\udc80"]),
    # huge strengths
    ("add 1e40", (*GEN, "--add", "{ws}/push.safetensors:1e40"), None, 1, ["1e+40", "'push'", "bound", "within"]),
    ("add 1e9", (*GEN, "--add", "{ws}/push.safetensors:1e9"), None, 1, ["1e+09", "bound"]),
    ("add -101", (*GEN, "--add", "{ws}/push.safetensors:-101"), None, 1, ["-101", "+-100"]),
    ("raw beyond 100 median norms", (*GEN, "--add", "{ws}/push.safetensors:150", "--raw"), None, 1, ["150", "+-100", "--raw"]),
    ("clamp -1e39", (*GEN, "--clamp", "{ws}/push.safetensors:-1e39"), None, 1, ["-1e+39", "bound"]),
    ("sweep strengths 0,1e40", ("sweep", "--direction", "{ws}/push.safetensors", "--model", "{tiny}", "--strengths", "0,1e40",
                                "--samples", "1", "--out", "{ws}/sweep-new"), None, 1, ["1e+40", "bound"]),
    ("serve add 1e40", ("serve", "--model", "{tiny}", "--add", "{ws}/push.safetensors:1e40"), None, 1, ["1e+40", "bound"]),
    # --out that cannot be written
    ("generate out in read-only folder", (*GEN, "--out", "{ro}/x.jsonl"), None, 1, ["x.jsonl", "not writable", "another path"]),
    ("generate out under a file", (*GEN, "--out", "{ws}/afile/x.jsonl"), None, 1, ["afile", "is a file, not a folder"]),
    ("generate out is a folder", (*GEN, "--out", "{ws}/somefolder"), None, 1, ["somefolder", "is a folder, not a file", "give a file name"]),
    ("generate out is a folder, --force", (*GEN, "--out", "{ws}/somefolder", "--force"), None, 1, ["somefolder", "is a folder, not a file"]),
    ("generate out exists", (*GEN, "--out", "{ws}/existing.jsonl"), None, 1, ["existing.jsonl", "already exists", "--force"]),
    ("judge out in read-only folder", ("judge", "score", "{ws}/answers.jsonl", "--out", "{ro}/j.jsonl"), None, 1, ["j.jsonl", "not writable"]),
    ("judge out under a file", ("judge", "score", "{ws}/answers.jsonl", "--out", "{ws}/afile/j.jsonl"), None, 1, ["afile", "not a folder"]),
    ("judge out is a folder", ("judge", "score", "{ws}/answers.jsonl", "--out", "{ws}/somefolder", "--force"), None, 1, ["somefolder", "not a file"]),
    ("sweep out under a file", (*SWEEP, "--out", "{ws}/afile/sw"), None, 1, ["afile", "is a file, not a folder"]),
    ("sweep out is a file", (*SWEEP, "--out", "{ws}/afile"), None, 1, ["afile", "is a file, not a folder", "give a folder"]),
    ("sweep out in read-only folder", (*SWEEP, "--out", "{ro}/sw"), None, 1, ["sw", "not writable"]),
    ("random out in read-only folder", ("directions", "random", "--like", "{ws}/push.safetensors", "--out", "{ro}/r.safetensors"), None, 1, ["r.safetensors", "not writable"]),
    ("random out under a file", ("directions", "random", "--like", "{ws}/push.safetensors", "--out", "{ws}/afile/r.safetensors"), None, 1, ["afile", "not a folder"]),
    ("random out is a folder", ("directions", "random", "--like", "{ws}/push.safetensors", "--out", "{ws}/somefolder.safetensors", "--force"), None, 1,
     ["somefolder.safetensors", "is a folder"]),
    # devices
    ("device bogus", (*GEN, "--device", "bogus"), None, 1, ["--device 'bogus'", "use cpu"]),
    ("device cuda:99", (*GEN, "--device", "cuda:99"), None, 1, ["--device 'cuda:99'", "CUDA"]),
    ("sweep device bogus", (*SWEEP, "--device", "bogus"), None, 1, ["--device 'bogus'"]),
    ("extract device bogus", ("extract", "--tuned", "{ws}/ad-unknown", "--sae", "sae-l15", "--device", "bogus"), None, 1, ["--device 'bogus'"]),
    # corrupt or pickled weights
    ("truncated adapter", ("generate", "hi", "--model", "{ws}/ad-trunc"), None, 1, ["adapter_model.safetensors", "truncated or corrupt"]),
    ("pickled adapter", ("generate", "hi", "--model", "{ws}/ad-pickle"), None, 1, ["adapter_model.bin", "pickled", "refuses", "safetensors"]),
    ("pickled model", ("generate", "hi", "--model", "{ws}/tiny-pickle"), None, 1, ["pytorch_model.bin", "pickled", "refuses"]),
    ("truncated model", ("generate", "hi", "--model", "{ws}/tiny-trunc"), None, 1, ["model.safetensors", "truncated or corrupt"]),
    ("import a pickled .pt", ("directions", "import", "{ws}/evil.pt", "--name", "x", "--layer", "1", "--model", "{tiny}"), None, 1,
     ["evil.pt", "pickled", "refuses", "nothing from it ran"]),
    ("import an object .npy", ("directions", "import", "{ws}/objects.npy", "--name", "x", "--layer", "1", "--model", "{tiny}"), None, 1,
     ["objects.npy", "pickled", "refuses"]),
    ("import a vector at layer 9", ("directions", "import", "{ws}/v.pt", "--name", "x", "--layer", "9", "--model", "{tiny}"), None, 1,
     ["layer 9 out of range", "0 to 3"]),
    # messages that used to mislead
    ("summarize a bad line", ("sweep", "summarize", "{ws}/sweep-bad-line"), None, 1, ["results.jsonl:1", "fix or delete that line"]),
    ("summarize a non-record", ("sweep", "summarize", "{ws}/sweep-not-record"), None, 1, ["results.jsonl:1", "not a sweep record"]),
    ("summarize a bad sweep.json", ("sweep", "summarize", "{ws}/sweep-bad-config"), None, 1, ["sweep.json", "restore it"]),
    ("adapter with unknown base", ("extract", "--tuned", "{ws}/ad-unknown", "--sae", "sae-l15"), None, 1,
     ["adapter_config.json", "'x'", "base_model_name_or_path", "--base"]),
    ("generate on adapter with unknown base", ("generate", "hi", "--model", "{ws}/ad-unknown"), None, 1, ["adapter_config.json", "'x'"]),
    ("neither model nor adapter", ("generate", "hi", "--model", "{ws}/neither"), None, 1, ["neither", "adapter folder"]),
    ("d_model mismatch", (*GEN, "--add", "{ws}/wide.safetensors:0.3"), None, 1, ["'wide'", "d_model 32", "d_model 64", "use a direction made for"]),
    ("direction layer beyond the model", (*GEN, "--add", "{ws}/deep.safetensors:0.3"), None, 1, ["'deep'", "layer 10", "--layer 0 to 3"]),
    ("max-new-tokens beyond the context", ("generate", "hi", "--model", "{tiny}", "--max-new-tokens", "600"), None, 1, ["600", "at most 511"]),
    ("--clamp without a value", (*GEN, "--clamp"), None, 2, ["--clamp", "requires an argument", "steerkit generate --help"]),
    ("unknown option", (*GEN, "--strenght", "1"), None, 2, ["--strenght", "steerkit generate --help"]),
    ("bad integer", ("generate", "hi", "-n", "many"), None, 2, ["'-n'", "steerkit generate --help"]),
    # checks that used to run after the model load
    ("unknown direction", (*GEN, "--add", "nosuch:0.3"), None, 1, ["unknown direction 'nosuch'"]),
    ("strength nan", (*GEN, "--add", "{ws}/push.safetensors:nan"), None, 1, ["'nan'", "finite number"]),
    ("layer 99", (*GEN, "--add", "{ws}/push.safetensors:0.3", "--layer", "99"), None, 1, ["layer 99 out of range", "0 to 3"]),
    ("batch-size 0", (*GEN, "--batch-size", "0"), None, 1, ["--batch-size", "at least 1", "got 0"]),
    ("sweep batch-size 0", (*SWEEP, "--batch-size", "0"), None, 1, ["--batch-size", "got 0"]),
    ("sweep unknown direction", ("sweep", "--direction", "nosuch", "--model", "{tiny}"), None, 1, ["unknown direction 'nosuch'"]),
    ("sweep layer 99", (*SWEEP, "--layer", "99"), None, 1, ["layer 99 out of range"]),
    ("serve max-batch 0", ("serve", "--model", "{tiny}", "--max-batch", "0"), None, 1, ["--max-batch", "got 0"]),
    ("serve unknown direction", ("serve", "--model", "{tiny}", "--add", "nosuch:0.3"), None, 1, ["unknown direction 'nosuch'"]),
    # empty prompts
    ("empty prompt", ("generate", "", "--model", "{tiny}"), None, 1, ["prompt 0", "empty prompt", "give some text"]),
    ("empty prompt in jsonl", ("generate", "-f", "{ws}/empty.jsonl", "--model", "{tiny}"), None, 1, ["empty.jsonl:1", "empty prompt"]),
]


@pytest.mark.parametrize("name, args, stdin, code, want", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_any_work(request, ws, tiny_dir, no_loading, name, args, stdin, code, want):
    ro = request.getfixturevalue("ro") if any("{ro}" in a for a in args) else None
    argv = [a.format(ws=ws, tiny=tiny_dir, ro=ro) for a in args]
    want = [w.format(ws=ws, tiny=tiny_dir, ro=ro) for w in want]
    before = _snapshot(ws, tiny_dir)
    r = runner.invoke(app, argv, input=stdin)
    assert r.exception is None or isinstance(r.exception, SystemExit), f"{type(r.exception).__name__}: {r.exception}"
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in r.output
    for w in want:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    if name == "summarize a bad line":
        assert "--force" not in lines[0]  # `sweep summarize` has no --force
    assert r.stdout == ""
    assert _snapshot(ws, tiny_dir) == before, "a file was created or changed"
    assert not list(ws.glob("PWNED*")), "a pickled payload ran"


def test_every_issue_item_has_cases():
    assert len(CASES) >= 40


def test_debug_shows_the_traceback(ws, tiny_dir, no_loading, monkeypatch):
    monkeypatch.setenv("STEERKIT_DEBUG", "1")
    from steerkit.errors import SteerkitError

    r = runner.invoke(app, ["generate", "-f", str(ws / "binary.bin"), "--model", str(tiny_dir)])
    assert isinstance(r.exception, SteerkitError) and "binary.bin" in str(r.exception)


def test_server_refuses_strengths_beyond_the_bound_and_lone_surrogates(tiny, tmp_path):
    """Malformed requests that used to crash the server (500) get 4xx OpenAI errors, through the
    official client and as raw bodies."""
    openai = pytest.importorskip("openai")
    from starlette.testclient import TestClient

    from steerkit.directions import from_vector
    from steerkit.serve import ServeConfig, create_app

    d = from_vector(torch.ones(tiny.d_model), name="flat", model=tiny, layer=1, kind="vector", median_norm=2.0)
    save_direction(d, tmp_path / "flat.safetensors")
    mp = pytest.MonkeyPatch()
    mp.setenv("STEERKIT_DIRECTIONS", str(tmp_path))
    msgs = [{"role": "user", "content": "hello"}]

    def steer(strength, **kw):
        return json.dumps({"messages": msgs, "max_tokens": 2, "steering": [{"direction": "flat", "strength": strength, **kw}]}).encode()

    bad = {
        "lone surrogate in content": (b'{"messages": [{"role": "user", "content": "x \\ud800 y"}], "max_tokens": 2}', "messages[0].content"),
        "lone surrogate in stop": (b'{"messages": [{"role": "user", "content": "x"}], "stop": ["\\udfff"], "max_tokens": 2}', "stop[0]"),
        "lone surrogate in direction": (steer(1).replace(b'"flat"', b'"\\ud83d"'), "steering[0].direction"),
        "strength 1e40": (steer(1e40), "steering[0].strength"),
        "strength 1e9": (steer(1e9), "steering[0].strength"),
        "raw strength beyond 100 median norms": (steer(250, raw=True), "steering[0].strength"),
        "clamp -1e39": (steer(-1e39, mode="clamp"), "steering[0].strength"),
        "integer strength too big for a float": (steer(1).replace(b'"strength": 1', b'"strength": 1' + b"0" * 400), "steering[0].strength"),
        "direction name too long for a file": (steer(1).replace(b'"flat"', b'"' + b"a" * 5000 + b'"'), "steering[0].direction"),
    }
    try:
        with TestClient(create_app(tiny, ServeConfig(max_batch=4)), raise_server_exceptions=False) as c:
            for case, (body, param) in bad.items():
                r = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
                assert 400 <= r.status_code < 500, (case, r.status_code, r.text)
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", case
                assert err["param"] == param, (case, err)
            ok = c.post("/v1/chat/completions", content=steer(50, raw=True))  # within the bound: served
            assert ok.status_code == 200, ok.text
            client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", max_retries=0, http_client=c)
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=tiny.name, messages=msgs, max_tokens=2,
                                               extra_body={"steering": [{"direction": "flat", "mode": "add", "strength": 1e40}]})
            assert e.value.status_code == 400 and e.value.param == "steering[0].strength" and "bound" in e.value.message
            with pytest.raises(openai.BadRequestError) as e:  # the client cannot send lone surrogates: raw bodies above
                client.chat.completions.create(model=tiny.name, messages=msgs, max_tokens=2,
                                               extra_body={"steering": [{"direction": "flat", "strength": 10**400}]})
            assert e.value.param == "steering[0].strength" and "finite number" in e.value.message
            assert c.get("/health").json()["errors"] == 0  # nothing reached the worker
    finally:
        mp.undo()


def test_records_of_a_tuned_model_name_it(tmp_path, tiny_dir):
    """A record copied out of its folder still says which organism made it."""
    import hashlib

    from peft import LoraConfig, get_peft_model

    from steerkit.finetune import file_sha256, save_adapter
    from steerkit.testing import tiny_hf_model

    peft_model = get_peft_model(tiny_hf_model(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    ad = save_adapter(peft_model, tmp_path / "organism", str(tiny_dir))
    r = runner.invoke(app, ["generate", "hi", "--model", str(ad), "--max-new-tokens", "2", "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout.splitlines()[0])
    assert rec["model"] == "tiny-llama"  # the base's name: its directions apply
    assert rec["tuned"]["path"] == str(ad.resolve())
    want = hashlib.sha256(file_sha256(ad / "adapter_model.safetensors").encode()).hexdigest()[:16]
    assert rec["tuned"]["sha256"] == want
    plain = runner.invoke(app, ["generate", "hi", "--model", str(tiny_dir), "--max-new-tokens", "2", "--json"])
    assert "tuned" not in json.loads(plain.stdout.splitlines()[0])


# --- real processes: what a terminal shows --------------------------------------------------------


def _run(args, stdin=None, env=None, cwd=None):
    e = {k: v for k, v in os.environ.items() if k != "STEERKIT_DEBUG"} | {"COLUMNS": "300"} | (env or {})
    return subprocess.run([str(STEERKIT), *map(str, args)], input=stdin, capture_output=True, env=e, cwd=cwd, timeout=120)


def _one_line(p, code=1):
    err = p.stderr.decode()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == code, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_subprocess_one_lines_and_debug_traceback(ws, tiny_dir):
    line = _one_line(_run(["generate", "--model", tiny_dir], stdin=b"ab\xff\xfe\n"))
    assert "<stdin>" in line
    line = _one_line(_run(["generate", "hi", "--model", tiny_dir, "--clamp"]), code=2)  # no box of three lines
    assert "--clamp" in line and "--help" in line
    line = _one_line(_run(["directions", "import", ws / "evil.pt", "--name", "x", "--layer", "1", "--model", tiny_dir]))
    assert "pickled" in line and "weights_only" not in line  # none of torch's advice about unpickling
    assert not list(ws.glob("PWNED*"))
    dbg = _run(["generate", "-f", ws / "binary.bin", "--model", tiny_dir], env={"STEERKIT_DEBUG": "1"})
    assert dbg.returncode == 1 and "Traceback" in dbg.stderr.decode() and "SteerkitError" in dbg.stderr.decode()


def test_subprocess_generate_is_quiet(ws, tiny_dir, tmp_path):
    """A real steered run prints no library warnings (transformers' past_key_values FutureWarning
    among them), only what it wrote."""
    p = _run(["generate", "hi", "--model", tiny_dir, "--max-new-tokens", "3", "--json", "--add", f"{ws / 'push.safetensors'}:0.5",
              "--out", tmp_path / "o.jsonl"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr.decode()
    err = p.stderr.decode()
    assert "Warning" not in err and "past_key_values" not in err, err
    assert [ln for ln in err.splitlines() if ln.strip()] == [f"wrote 1 records to {tmp_path / 'o.jsonl'}"]
