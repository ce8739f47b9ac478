"""Steering specs (steerkit.steering_spec): the CLI's --add/--clamp/--ablate flags and a server
request's steering items parsed, then resolved into Interventions for the tiny model, with the
errors each refuses (message, and for request items the field and code)."""

import pytest
import torch
from typer.testing import CliRunner

from steerkit.directions import Direction, from_vector, save_direction
from steerkit.errors import SteerkitError
from steerkit.steering_spec import SteeringSpec, SteeringSpecError, parse_flags, parse_request_items, resolve_steering


@pytest.fixture(scope="module")
def push(tiny, tmp_path_factory):
    """A vector direction 'push' for the tiny model at layer 1, saved in a folder of its own."""
    d = from_vector(torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(0)), name="push", model=tiny, layer=1, kind="random", median_norm=2.0)
    folder = tmp_path_factory.mktemp("dirs")
    return save_direction(d, folder / "push.safetensors")


@pytest.fixture()
def named(push, monkeypatch):
    """'push' findable by name."""
    monkeypatch.setenv("STEERKIT_DIRECTIONS", str(push.parent))
    return "push"


# --- the flags --------------------------------------------------------------------------------


def test_parse_flags_in_order_with_layer_and_raw():
    specs = parse_flags(["a:0.5", "C:/x/y.safetensors:-1"], ["b:3"], ["c"], layer=2, raw=True)
    assert specs == [
        SteeringSpec("add", "a", 0.5, 2, True),
        SteeringSpec("add", "C:/x/y.safetensors", -1.0, 2, True),  # a path with ':' keeps all but the last part
        SteeringSpec("clamp", "b", 3.0, 2, True),
        SteeringSpec("ablate", "c", 0.0, 2, True),
    ]
    assert parse_flags() == [] and parse_flags(["a:1"])[0].layer is None


@pytest.mark.parametrize("add, clamp, ablate, message", [
    (["push"], [], [], "--add 'push' needs a value: NAME:VALUE, e.g. push:0.3"),
    ([], ["push"], [], "--clamp 'push' needs a value"),
    (["push:abc"], [], [], "--add 'push:abc': 'abc' is not a number"),
    (["push:nan"], [], [], "--add 'push:nan': strength must be a finite number, got 'nan'"),
    (["push:inf"], [], [], "--add 'push:inf': strength must be a finite number, got 'inf'"),
    ([":0.3"], [], [], "--add ':0.3': give NAME:VALUE"),
    ([], [], ["push:1"], "--ablate 'push:1' takes no value: write --ablate push"),
])
def test_parse_flags_refuses(add, clamp, ablate, message):
    with pytest.raises(SteerkitError) as e:
        parse_flags(add, clamp, ablate)
    assert str(e.value).startswith(message), str(e.value)


# --- request items ----------------------------------------------------------------------------


def test_parse_request_items():
    items = [{"direction": "a", "mode": "add", "strength": 2}, {"direction": "b", "mode": "ablate"},
             {"direction": "c", "mode": "clamp", "strength": -1.5, "layer": 3, "raw": True}]
    assert list(parse_request_items(items, 4)) == [
        SteeringSpec("add", "a", 2.0, None, False, "steering[0]"),
        SteeringSpec("ablate", "b", 0.0, None, False, "steering[1]"),
        SteeringSpec("clamp", "c", -1.5, 3, True, "steering[2]"),
    ]
    one = list(parse_request_items({"direction": "a", "strength": 0.1}, 4))  # one object, mode add by default
    assert one == [SteeringSpec("add", "a", 0.1, where="steering[0]")] and isinstance(one[0].strength, float)
    assert list(parse_request_items([], 4)) == []


@pytest.mark.parametrize("raw, message, param, code", [
    ("push", "steering must be a list of {direction, mode, strength} objects", "steering", None),
    ([1], "steering[0] must be an object with direction, mode and strength", "steering[0]", None),
    ([{"direction": "a", "strenght": 1}], "steering[0]: unknown field(s) strenght; allowed: direction, mode, strength, layer, raw", "steering[0]", None),
    ([{"direction": "", "strength": 1}], "steering[0].direction must be a direction name", "steering[0].direction", None),
    ([{"direction": 3, "strength": 1}], "steering[0].direction must be a direction name", "steering[0].direction", None),
    ([{"direction": "a", "mode": "scale", "strength": 1}], "steering[0].mode 'scale' is not one of add, clamp, ablate", "steering[0].mode", "invalid_mode"),
    ([{"direction": "a", "mode": "clamp"}], "steering[0].strength is required for mode clamp", "steering[0].strength", None),
    ([{"direction": "a", "strength": "lots"}], "steering[0].strength must be a finite number, got 'lots'", "steering[0].strength", "invalid_strength"),
    ([{"direction": "a", "strength": True}], "steering[0].strength must be a finite number, got True", "steering[0].strength", "invalid_strength"),
    ([{"direction": "a", "strength": float("nan")}], "steering[0].strength must be a finite number", "steering[0].strength", "invalid_strength"),
    ([{"direction": "a", "strength": 10**400}], "steering[0].strength must be a finite number, got 1000000000", "steering[0].strength", "invalid_strength"),
    ([{"direction": "a", "strength": 1, "layer": 4}], "steering[0].layer must be an integer from 0 to 3, got 4", "steering[0].layer", None),
    ([{"direction": "a", "strength": 1, "layer": True}], "steering[0].layer must be an integer from 0 to 3, got True", "steering[0].layer", None),
    ([{"direction": "a", "strength": 1, "raw": "yes"}], "steering[0].raw must be true or false", "steering[0].raw", None),
    ([{"direction": "a", "strength": 1}, {"direction": "b", "mode": "x"}], "steering[1].mode", "steering[1].mode", "invalid_mode"),
])
def test_parse_request_items_refuses(raw, message, param, code):
    with pytest.raises(SteeringSpecError) as e:
        list(parse_request_items(raw, 4))
    assert str(e.value).startswith(message) and e.value.param == param and e.value.code == code
    assert isinstance(e.value, SteerkitError)


# --- resolution -------------------------------------------------------------------------------


def test_resolve_flags(tiny, push):
    ivs = resolve_steering(tiny, parse_flags([f"{push}:0.5"], [f"{push}:3"], [], layer=2, raw=True))
    assert [iv.describe() for iv in ivs] == [{"direction": "push", "mode": "add", "layer": 2, "strength": 0.5, "raw": True},
                                             {"direction": "push", "mode": "clamp", "layer": 2, "strength": 3.0, "raw": True}]
    assert ivs[0].direction is ivs[1].direction  # read once
    assert resolve_steering(tiny, []) == ()


def test_resolve_uses_directions_read_and_the_cache(tiny, push):
    from steerkit.directions import load_direction

    read = load_direction(push)
    ivs = resolve_steering(tiny, [SteeringSpec("add", "p", 1.0)], directions={"p": read})
    assert ivs[0].direction is read
    cache = {}
    a = resolve_steering(tiny, [SteeringSpec("add", str(push), 1.0)], cache=cache)
    b = resolve_steering(tiny, [SteeringSpec("add", str(push), 2.0)], cache=cache)
    assert list(cache) == [str(push)] and a[0].key() == b[0].key()  # one slot of a batch's plan
    wide = Direction(name="wide", vector=torch.ones(32), model="tiny-llama", layer=1, hook_name="blocks.1.hook_out", kind="vector", median_norm=1.0)
    with pytest.raises(SteerkitError, match="d_model 32"):  # what the CLI read is still checked against the model
        resolve_steering(tiny, [SteeringSpec("add", "w", 1.0)], directions={"w": wide})


def test_resolve_from_the_command_line_refuses(tiny, push, named):
    cases = [
        (SteeringSpec("add", "nosuch", 0.3), "unknown direction 'nosuch'"),
        (SteeringSpec("add", "push", 0.3, layer=99), "layer 99 out of range: the model has 4 layers (0 to 3)"),
        (SteeringSpec("add", "push", 1e40), "strength 1e+40 for 'push' is beyond the bound of +-100"),
        (SteeringSpec("add", "push", 250.0, raw=True), "strength 250 for 'push' is beyond the bound of +-200 (in absolute units (--raw"),
        (SteeringSpec("scale", "push", 1.0), "mode 'scale' is not one of add, clamp, ablate"),
    ]
    for spec, message in cases:
        with pytest.raises(SteeringSpecError) as e:
            resolve_steering(tiny, [spec])
        assert str(e.value).startswith(message) and e.value.param is None, (spec, str(e.value))
    with pytest.raises(SteeringSpecError, match="^direction 'push' is given twice with mode add on one row") as e:
        resolve_steering(tiny, parse_flags(["push:0.1", "push:0.2"]))
    assert e.value.param is None
    assert len(resolve_steering(tiny, parse_flags(["push:0.1"], ["push:1"]))) == 2  # two modes: two slots


def test_resolve_request_items_refuses(tiny, push, named):
    def fails(items, allow_paths=False):
        with pytest.raises(SteeringSpecError) as e:
            resolve_steering(tiny, parse_request_items(items, tiny.n_layers), allow_paths=allow_paths)
        return str(e.value), e.value.param, e.value.code

    msg, param, code = fails([{"direction": "nope", "strength": 1}])
    assert msg.startswith("unknown direction 'nope'") and (param, code) == ("steering[0].direction", "invalid_direction")
    msg, param, code = fails([{"direction": "push", "strength": 1}, {"direction": str(push), "strength": 1}])
    assert msg.startswith(f"direction {str(push)!r}: give a direction name; this server does not read paths (start it with --allow-paths)")
    assert (param, code) == ("steering[1].direction", "invalid_direction")
    msg, param, code = fails([{"direction": "x" * 5000, "strength": 1}])  # no file system takes the name
    assert msg.startswith("unknown direction 'xxxx") and "give the name of a direction file" in msg and param == "steering[0].direction"
    msg, param, code = fails([{"direction": "push", "strength": 1e9}])
    assert "beyond the bound" in msg and (param, code) == ("steering[0].strength", "invalid_strength")
    msg, param, code = fails([{"direction": "push", "strength": 1}, {"direction": "push", "strength": 2}])
    assert msg.startswith("direction 'push' is given twice") and (param, code) == ("steering", None)
    # the first bad item is reported, even when a later one is malformed
    msg, param, code = fails([{"direction": "nope", "strength": 1}, {"direction": "push", "mode": "x"}])
    assert param == "steering[0].direction"
    ok = resolve_steering(tiny, parse_request_items([{"direction": str(push), "strength": 1}], tiny.n_layers), allow_paths=True)
    assert ok[0].direction.name == "push"


def test_resolve_refuses_an_sae_direction_whose_sae_does_not_load(tiny, tmp_path):
    d = Direction(name="lat", vector=torch.ones(tiny.d_model), model="tiny-llama", layer=1, hook_name="blocks.1.hook_out", kind="sae-latent",
                  median_norm=1.0, sae=str(tmp_path / "no-sae"), latents=(3,))
    save_direction(d, tmp_path / "lat.safetensors")
    spec = [{"direction": str(tmp_path / "lat.safetensors"), "mode": "ablate"}]
    with pytest.raises(SteeringSpecError) as e:
        resolve_steering(tiny, parse_request_items(spec, tiny.n_layers))
    assert e.value.param == "steering" and "no-sae" in str(e.value)
    assert len(resolve_steering(tiny, parse_request_items([{**spec[0], "mode": "add", "strength": 1}], tiny.n_layers))) == 1  # add needs no SAE


# --- the serve command ------------------------------------------------------------------------


def test_cli_serve_resolves_default_steering(tiny_dir, push, monkeypatch):
    """`steerkit serve` up to uvicorn: the app it would serve steers by --add/--clamp/--layer."""
    uvicorn = pytest.importorskip("uvicorn")
    from fastapi.testclient import TestClient

    from steerkit.cli import app

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda api, **kw: seen.update(api=api, **kw))
    r = CliRunner().invoke(app, ["serve", "--model", str(tiny_dir), "--port", "8123", "--add", f"{push}:0.4", "--clamp", f"{push}:2", "--layer", "2"])
    assert r.exit_code == 0, r.output
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    assert "serving tiny-llama on http://127.0.0.1:8123/v1 (default steering: add push:0.4, clamp push:2.0)" in r.stderr
    with TestClient(seen["api"]) as client:
        got = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "seed": 0})
    assert got.status_code == 200, got.text
    assert got.json()["steering"] == [{"direction": "push", "mode": "add", "layer": 2, "strength": 0.4},
                                      {"direction": "push", "mode": "clamp", "layer": 2, "strength": 2.0}]
    r = CliRunner().invoke(app, ["serve", "--model", str(tiny_dir), "--add", f"{push}:0.1", "--add", f"{push}:0.2"])
    assert r.exit_code == 1 and "is given twice with mode add" in r.output  # refused at start, not on every request
