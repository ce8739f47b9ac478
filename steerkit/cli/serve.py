"""`steerkit serve`: a steered model behind an OpenAI-compatible API (FastAPI + uvicorn)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from steerkit.cli import app
from steerkit.cli.common import AnyModelOpt, DeviceOpt, DtypeOpt, LayerOpt, ModelOpt, err, load_with_status
from steerkit.cli.generate import AblateOpt, AddOpt, ClampOpt, PositionsOpt, RawOpt, precheck
from steerkit.errors import SteerkitError


@app.command("serve")
def serve_cmd(
    host: Annotated[str, typer.Option("--host", help="Address to bind; the default is loopback only (the API has no authentication).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port.")] = 8000,
    add: AddOpt = [],
    clamp: ClampOpt = [],
    ablate: AblateOpt = [],
    layer: LayerOpt = None,
    raw: RawOpt = False,
    positions: PositionsOpt = "all",
    max_batch: Annotated[int, typer.Option("--max-batch", help="Rows (requests x n) per forward pass.")] = 16,
    batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", help="How long an idle server waits for more requests to batch with the first.")] = 50.0,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Rows allowed to wait; more are answered 429.")] = 256,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", help="Largest request body accepted (413 beyond).")] = 1 << 20,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Completion length for requests that give no max_tokens.")] = 256,
    allow_paths: Annotated[bool, typer.Option("--allow-paths", help="Let requests name direction files by path, not only by name.")] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level (info logs every request).")] = "warning",
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    any_model: AnyModelOpt = False,
) -> None:
    """Serve a (steered) model with an OpenAI-compatible chat API.

    --add/--clamp/--ablate set the default steering; a request's "steering" field replaces it,
    e.g. "steering": [{"direction": "persona", "mode": "add", "strength": 0.3}] ([] for none).
    Concurrent requests are batched, rows with different steering in one forward pass.

    Examples:

      steerkit serve --port 8000 --add persona:0.3

      curl -s localhost:8000/v1/chat/completions -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}]}'
    """
    from steerkit.interventions import POSITIONS
    from steerkit.serve import ServeConfig, create_app
    from steerkit.steering_spec import resolve_steering

    if positions not in POSITIONS:
        raise SteerkitError(f"--positions {positions!r} is not one of {', '.join(POSITIONS)}")
    if not 0 < port < 65536:
        raise SteerkitError(f"--port must be from 1 to 65535, got {port}")
    try:
        import uvicorn
    except ImportError:
        raise SteerkitError("serving needs the serve extra: pip install 'steerkit[serve]'") from None

    # every option checked before the model loads
    config = ServeConfig(max_batch=max_batch, batch_wait=batch_wait_ms / 1000, max_queue=max_queue, max_body_bytes=max_body_bytes, default_max_tokens=max_tokens,
                         positions=positions, allow_paths=allow_paths, any_model=any_model)  # type: ignore[arg-type]
    _, specs, dirs = precheck(model, device, add, clamp, ablate, layer, raw, any_model)
    model_obj = load_with_status(model, device, dtype)
    ivs = resolve_steering(model_obj, specs, any_model=any_model, directions=dirs)
    config = dataclasses.replace(config, steering=tuple(ivs))
    api = create_app(model_obj, config)
    steer = ", ".join(f"{d['mode']} {d['direction']}" + (f":{d['strength']}" if "strength" in d else "") for d in (iv.describe() for iv in ivs)) or "none"
    err.print(f"serving {model_obj.name} on http://{host}:{port}/v1 (default steering: {steer}); Ctrl-C stops")
    try:
        uvicorn.run(api, host=host, port=port, log_level=log_level)
    except OSError as e:  # pragma: no cover - e.g. the port is taken
        raise SteerkitError(f"cannot serve on {host}:{port}: {e}") from None
