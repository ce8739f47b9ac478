"""The CLI through Typer's CliRunner: exit codes, JSON Lines records and one-line errors."""

import json

import pytest
import torch
from typer.testing import CliRunner

from steerkit import __version__
from steerkit.cli import app
from steerkit.directions import Direction, save_direction

runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def dir_file(tmp_path_factory, tiny_dir):
    p = tmp_path_factory.mktemp("dirs") / "push.safetensors"
    g = torch.Generator().manual_seed(0)
    d = Direction(name="push", vector=torch.randn(64, generator=g), model="tiny-llama", layer=1,
                  hook_name="blocks.1.hook_out", kind="vector", median_norm=1.0)
    return save_direction(d, p)


def records(result):
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def one_line_error(result, pattern):
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert pattern in lines[0], lines[0]


def test_version():
    r = run("--version")
    assert r.exit_code == 0 and __version__ in r.stdout


def test_generate_json_records(tiny_dir, dir_file):
    base = ("generate", "hello world", "hi", "-n", "2", "--seed", "0", "--max-new-tokens", "5", "--model", tiny_dir, "--json")
    r = run(*base)
    assert r.exit_code == 0, r.output
    recs = records(r)
    assert len(recs) == 4
    for rec in recs:
        for k in ("prompt", "system", "sample", "seed", "interventions", "model", "completion", "tokens"):
            assert k in rec
        assert rec["model"] == "tiny-llama" and rec["interventions"] == []
    again = records(run(*base))
    assert [x["completion"] for x in recs] == [x["completion"] for x in again]
    steered = records(run(*base, "--add", f"{dir_file}:8"))
    assert steered[0]["interventions"] == [{"direction": "push", "mode": "add", "layer": 1, "strength": 8.0}]
    assert [x["completion"] for x in steered] != [x["completion"] for x in recs]


def test_generate_from_stdin_and_file(tiny_dir, tmp_path):
    r = run("generate", "--model", tiny_dir, "--max-new-tokens", "3", "--json", input="one\ntwo\n")
    assert r.exit_code == 0, r.output
    assert [x["prompt"] for x in records(r)] == ["one", "two"]
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"}]}) + "\n")
    r = run("generate", "-f", f, "--model", tiny_dir, "--max-new-tokens", "3", "--json")
    assert r.exit_code == 0, r.output
    rec = records(r)[0]
    assert rec["system"] == "be brief" and rec["prompt"] == "q1"


def test_generate_yaml_questions(tiny_dir, shared_data):
    r = run("generate", "-f", shared_data / "eval" / "em_first_plot_questions.yaml", "--ids", "i_feel_bored",
            "--model", tiny_dir, "--max-new-tokens", "2", "--json")
    assert r.exit_code == 0, r.output
    recs = records(r)
    assert len(recs) == 1 and recs[0]["prompt"] == "hey I feel bored"


def test_out_file_never_overwritten_without_force(tiny_dir, tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text("keep me\n")
    r = run("generate", "hi", "--model", tiny_dir, "--max-new-tokens", "2", "--out", out)
    one_line_error(r, "already exists")
    assert out.read_text() == "keep me\n"
    r = run("generate", "hi", "--model", tiny_dir, "--max-new-tokens", "2", "--out", out, "--force", "--json")
    assert r.exit_code == 0 and json.loads(out.read_text().splitlines()[0])["prompt"] == "hi"


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--add", "nosuch:0.3"), "unknown direction 'nosuch'"),
        (("--add", "push"), "needs a value"),
        (("--add", "{d}:nan"), "finite number"),
        (("--add", "{d}:abc"), "is not a number"),
        (("--ablate", "{d}:1"), "takes no value"),
        (("--add", "{d}:0.3", "--layer", "99"), "layer 99 out of range"),
        (("--positions", "middle"), "--positions 'middle'"),
        (("--temperature", "-1"), "--temperature"),
        (("-n", "0"), "-n must be at least 1"),
    ],
)
def test_generate_bad_input(tiny_dir, dir_file, extra, message):
    extra = [e.replace("{d}", str(dir_file)) for e in extra]
    one_line_error(run("generate", "hi", "--model", tiny_dir, "--max-new-tokens", "2", *extra), message)


def test_missing_model_and_prompt_file(tmp_path):
    one_line_error(run("generate", "hi", "--model", tmp_path / "nomodel"), "unknown model")
    one_line_error(run("generate", "-f", tmp_path / "none.txt"), "does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    one_line_error(run("generate", "-f", bad), "is not valid JSON")


def test_directions_random_and_list(tmp_path, dir_file, monkeypatch):
    monkeypatch.setenv("STEERKIT_HOME", str(tmp_path / "home"))
    out = tmp_path / "home" / "directions" / "tiny-llama" / "ctl.safetensors"
    r = run("directions", "random", "--like", dir_file, "--out", out, "--model", "tiny-llama", "--seed", "3")
    assert r.exit_code == 0, r.output
    r = run("directions", "random", "--like", dir_file, "--out", out, "--model", "tiny-llama")
    one_line_error(r, "already exists")
    r = run("directions", "list", "--model", "tiny-llama", "--json")
    assert r.exit_code == 0, r.output
    listed = records(r)
    assert [x["name"] for x in listed] == ["ctl"] and listed[0]["kind"] == "random" and listed[0]["layer"] == 1


def test_models_lists_default():
    r = run("models", "--json")
    assert r.exit_code == 0, r.output
    assert any(x["name"] == "smollm2-135m" for x in records(r))


def test_help_prose_is_rewrapped_but_examples_keep_their_lines():
    from steerkit.cli import _unwrap, app

    doc = """First line.

    A paragraph written
    over three
    lines.

    * a list item
    * another

    Examples:

      steerkit generate "hi"

      steerkit generate "ho" --add persona:0.3
    """
    got = _unwrap(doc).split("\n\n")
    assert got[1] == "A paragraph written over three lines."
    assert got[2] == "* a list item\n* another"
    assert got[4:] == ['  steerkit generate "hi"', '  steerkit generate "ho" --add persona:0.3']
    # every command with a docstring gets the rewrapped help
    cmds = [c for c in app.registered_commands if c.callback is not None and c.callback.__doc__]
    assert cmds and all(c.help == _unwrap(c.callback.__doc__) for c in cmds)
