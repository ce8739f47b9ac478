"""A virtual environment with the peer steering tools, for the agreement tests and the peer
benchmark (development tooling, like :mod:`steerkit.testing`; users never need it).

steering-vectors 0.12.2 needs transformers<5 and repeng 0.4.0 needs numpy<2, while steerkit
runs on transformers 5, so the peers live in their own venv, built once per machine from the
package registry (CPU torch first, so pip never pulls a CUDA build) and cached under
``$STEERKIT_PEERS_VENV`` or ``<steerkit cache>/peers-venv-<hash>``. They run in a subprocess:
:func:`run_peer` sends :mod:`steerkit.peer_worker` a JSON task and reads back its JSON answer.
Not here: the comparisons themselves (tests/test_peers.py, bench/bench_peers.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from steerkit.errors import SteerkitError
from steerkit.fsutil import cache_dir

TORCH = os.environ.get("STEERKIT_PEERS_TORCH", "torch==2.13.0")
REQUIREMENTS = ("steering-vectors==0.12.2", "repeng==0.4.0", "transformers>=4.46,<5", "numpy<2", "gguf>=0.10")
WORKER = Path(__file__).with_name("peer_worker.py")


def venv_dir() -> Path:
    env = os.environ.get("STEERKIT_PEERS_VENV")
    if env:
        return Path(env).expanduser()
    key = hashlib.sha256(json.dumps([TORCH, *REQUIREMENTS, sys.version_info[:2]]).encode()).hexdigest()[:10]
    return cache_dir() / f"peers-venv-{key}"


def peer_python(build: bool = True) -> Path:
    """The peer venv's python, building the venv first if needed (~2 minutes, once)."""
    d = venv_dir()
    py = d / "bin" / "python"
    if (d / ".ready").exists():
        return py
    if not build:
        raise SteerkitError(f"peer venv {d} is not built yet")
    d.parent.mkdir(parents=True, exist_ok=True)
    # built in place under its final name (venv scripts hard-code their path); `.ready` last
    if d.exists():
        shutil.rmtree(d)
    subprocess.run([sys.executable, "-m", "venv", str(d)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for step in ([TORCH], list(REQUIREMENTS)):
        r = subprocess.run(pip + step, capture_output=True, text=True)
        if r.returncode:
            raise SteerkitError(f"building the peer venv failed at `pip install {' '.join(step)}`: {r.stderr.strip().splitlines()[-1:]}")
    (d / ".ready").write_text(json.dumps({"torch": TORCH, "requirements": REQUIREMENTS}))
    return py


def run_peer(task: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run one task in the peer venv (see :mod:`steerkit.peer_worker`) and return its answer."""
    py = peer_python()
    with tempfile.TemporaryDirectory() as td:
        tin, tout = Path(td) / "task.json", Path(td) / "answer.json"
        tin.write_text(json.dumps(task))
        env = dict(os.environ, PYTHONNOUSERSITE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.pop("PYTHONPATH", None)
        r = subprocess.run([str(py), str(WORKER), str(tin), str(tout)], capture_output=True, text=True, timeout=timeout, env=env)
        if r.returncode:
            raise RuntimeError(f"peer task {task.get('task')} failed:\n{r.stderr[-4000:]}")
        return json.loads(tout.read_text())
