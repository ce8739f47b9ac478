"""The README's Python block runs as written, so it cannot rot."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip()  # the example prints its completions


def test_readme_gives_exactly_two_setup_commands():
    text = README.read_text()
    first = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    cmds = [ln.split("#")[0].strip() for ln in first.splitlines() if ln.strip()]
    assert cmds == ["make demo", "make test"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci


def _shell_section() -> str:
    m = re.search(r"^### From the shell\n(.*?)^##", README.read_text(), flags=re.S | re.M)
    assert m, "README has no 'From the shell' section"
    return m.group(1)


def _options(command) -> set[str]:
    return {o for p in command.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ())) if o.startswith("-")}


def test_readme_shell_commands_name_real_options():
    """Every `steerkit ...` line of the section names a real command and real options; every
    `examples/...` line a script that exists, with options `steerkit generate` takes."""
    import shlex

    import typer.main

    from steerkit.cli import app

    root = typer.main.get_command(app)
    block = re.search(r"```bash\n(.*?)```", _shell_section(), flags=re.S).group(1)
    checked = 0
    for line in block.splitlines():
        words = shlex.split(line.split("#")[0])
        if not words:
            continue
        words = words[: words.index(">")] if ">" in words else words
        if words[0] == "steerkit":
            cmd, rest = root, words[1:]
            while rest and rest[0] in getattr(cmd, "commands", {}):
                cmd, rest = cmd.commands[rest[0]], rest[1:]
            assert cmd is not root, line
        else:
            script = README.parent / words[0]
            assert words[0].startswith("examples/") and script.is_file(), line
            cmd, rest = root.commands["generate"], words[1:]  # options after a script's arguments go to generate
        unknown = [w for w in rest if w.startswith("-") and w not in _options(cmd)]
        assert not unknown, f"{line!r}: {unknown} not options of `{cmd.name}`"
        checked += 1
    assert checked >= 5


def test_readme_documents_every_field_of_a_generate_record():
    """The stable record format in the README names every field `steerkit generate --json`
    writes (records made here from a Completion) and its format string."""
    from steerkit.generate import RECORD_FORMAT, Completion, Row, as_messages

    section = _shell_section()
    assert f"`{RECORD_FORMAT}`" in section
    rec = Completion(Row(as_messages("hi")), "hello", [1, 2], "stop", 7, 3).record("smollm2-135m", tuned={"path": "runs/x", "sha256": "ab"})
    rec["id"] = "0"  # added by the command, beside the record
    missing = [k for k in rec if f"`{k}`" not in section]
    assert not missing, f"README's record format does not name {missing}"
