"""Load a model spec into a TransformerBridge plus tokenizer, fully offline when possible.

What a spec may be (an alias, a folder, a ``.gguf``, a hub id, a PEFT adapter folder) and how it
resolves to weights on disk is :mod:`steerkit.model_specs`; this module loads them:
:func:`load_model` (any spec), :func:`load_tuned` (an adapter merged into its base, named after
the base), :func:`load_pretrained` (the one place a Hugging Face model is loaded). It also holds
:class:`LoadedModel` and the one hook scope every module uses to hook the residual stream
(:func:`bridge_hooks`, :func:`twin_hooks`, :func:`residuals`).

Weights load in float32 unless ``dtype`` says otherwise (:data:`DTYPES`: bfloat16 and float16
for big models on a GPU); steering, SAE and activation arithmetic stays float32 whatever the
weights' dtype (:mod:`steerkit.interventions`, :mod:`steerkit.activations`). ``device="auto"``
(``--device auto``) places a model too big for one GPU with Hugging Face's
``device_map="auto"`` (accelerate): its layers spread over every visible GPU, then CPU RAM.
What it leaves out: quantized inference.

Why one module of this size: the four ways a spec loads, the unwrapped twin and the hook scope
all keep :class:`LoadedModel`'s invariants (the twin matches the bridge; hooks go where
generation runs).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steerkit.decode_kernels import prepare_twin
from steerkit.errors import SteerkitError
from steerkit.fsutil import cache_dir, user_data_dir  # noqa: F401 - re-exported
from steerkit.model_specs import (  # noqa: F401 - the spec helpers are re-exported: older callers import them from here
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ALIAS_SYNONYMS,
    ALIASES,
    DEFAULT_ALIAS,
    DEFAULT_HF_ID,
    Alias,
    ModelInfo,
    adapter_base_spec,
    canonical_alias,
    canonical_name,
    check_adapter,
    check_layer,
    check_weight_files,
    dequantized_dir,
    file_sha256,
    is_adapter_dir,
    list_models,
    peek_model,
    quiet_logging,
    quiet_transformers,
    resolve_spec,
    tuned_info,
)

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready for steering: the bridge (hooks), the HF model inside it, the tokenizer."""

    name: str  # short name used for directions/<name>/ and in direction metadata
    source: str  # what the user asked for, resolved (path or hub id)
    bridge: Any  # transformer_lens TransformerBridge
    tokenizer: Any
    hf_model: torch.nn.Module = field(repr=False)
    # the same weights in a plain HF module tree, without the bridge's wrappers: generation runs
    # on it (the wrappers cost about a third of each decode step) with steering as plain torch
    # hooks on ``twin_layers``; None where it could not be built or did not match the bridge
    twin: torch.nn.Module | None = field(default=None, repr=False)
    twin_layers: Any = field(default=None, repr=False)
    # a tuned model loaded under its base's name: {"path": the adapter (or model) folder,
    # "sha256": the first 16 hex digits of its weights' hash}; records carry it beside "model"
    tuned: dict[str, str] | None = None

    @property
    def d_model(self) -> int:
        return int(self.hf_model.config.hidden_size)

    @property
    def n_layers(self) -> int:
        return int(self.hf_model.config.num_hidden_layers)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def context_length(self) -> int:
        cfg = self.hf_model.config
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            v = getattr(cfg, attr, None)
            if isinstance(v, int) and v > 0:
                return v
        return 2048

    def hook_name(self, layer: int) -> str:
        """Residual stream after block ``layer`` (0-based), as TransformerLens names it."""
        check_layer(layer, self.n_layers)
        return f"blocks.{layer}.hook_out"

    def eos_token_ids(self) -> list[int]:
        ids: set[int] = set()
        gen = getattr(self.hf_model, "generation_config", None)
        for src in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(i) for i in src)
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>") if self._has_token("<|im_end|>") else None
        if isinstance(im_end, int):
            ids.add(im_end)
        return sorted(ids)

    def _has_token(self, tok: str) -> bool:
        try:
            return tok in self.tokenizer.get_vocab()
        except Exception:  # pragma: no cover - exotic tokenizers
            return False

    def pad_token_id(self) -> int:
        if self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        return self.eos_token_ids()[0]


# --- reading the residual stream --------------------------------------------------------------


HookFn = Callable[..., torch.Tensor]  # (residual [B, T, D], hook=...) -> the residual to pass on


@contextmanager
def bridge_hooks(model: LoadedModel, hooks: Sequence[tuple[int, HookFn]]) -> Iterator[None]:
    """Forward hooks on the residual after the given blocks (``blocks.<L>.hook_out``) for the
    duration of the block: the one place a module hooks the bridge.

    Removes exactly its own handles on the way out, after exceptions and KeyboardInterrupt
    too, and leaves any hooks a user added themselves.
    """
    handles: list[tuple[Any, Any]] = []
    try:
        for layer, fn in hooks:
            name = model.hook_name(layer)
            hp = model.bridge.hook_dict.get(name)
            if hp is None:
                raise SteerkitError(f"model {model.name} has no hook point {name}")
            handles.append((hp, hp.add_hook(fn, dir="fwd")))
        yield
    finally:
        for hp, h in handles:
            h.hook.remove()
            if h in hp.fwd_hooks:
                hp.fwd_hooks.remove(h)


@contextmanager
def twin_hooks(model: LoadedModel, hooks: Sequence[tuple[int, HookFn]]) -> Iterator[None]:
    """The same hooks on ``model.twin`` (the unwrapped copy generation runs on): plain torch
    forward hooks on its decoder layers, the place of the bridge's ``blocks.<L>.hook_out``."""
    layers = model.twin_layers
    handles: list[Any] = []

    def on_output(fn: HookFn) -> Callable[..., Any]:
        def tfn(mod: Any, args: Any, out: Any) -> Any:
            if isinstance(out, tuple):
                return (fn(out[0]),) + tuple(out[1:])
            return fn(out)

        return tfn

    try:
        for layer, fn in hooks:
            if not 0 <= layer < len(layers):
                raise SteerkitError(f"model {model.name} has no layer {layer}")
            handles.append(layers[layer].register_forward_hook(on_output(fn)))
        yield
    finally:
        for h in handles:
            h.remove()


class _Stop(Exception):
    pass


@torch.inference_mode()
def residuals(
    model: LoadedModel,
    input_ids: torch.Tensor,
    layer: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Activations after block ``layer``: ``input_ids [B, T] -> [B, T, d_model]`` (float32).

    Runs the batch up to block ``layer`` and stops there (a hook records the block output and
    ends the forward pass), so reading layer 15 of 30 costs half a forward. With
    ``attention_mask`` the batch may be left- or right-padded; positions are derived from the
    mask. The statistics over these activations live in :mod:`steerkit.activations`.
    """
    box: list[torch.Tensor] = []

    def grab(x: torch.Tensor, hook: Any = None) -> torch.Tensor:
        box.append(x.detach())
        raise _Stop

    with bridge_hooks(model, [(layer, grab)]):
        kw: dict[str, Any] = {}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask.to(model.device)
            kw["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0).to(model.device)
        try:
            model.hf_model(input_ids=input_ids.to(model.device), use_cache=False, **kw)
        except _Stop:
            pass
    return box[0].float()


# the weights' dtypes --dtype offers, and the short names it accepts for them
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
# --device auto: Hugging Face's device_map="auto" (accelerate) spreads the layers over the GPUs
AUTO_DEVICE = "auto"


def check_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``--dtype`` as a torch dtype (None: float32); one line naming the choices when it is not
    one of :data:`DTYPES` (or a short name: bf16, fp16, fp32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise SteerkitError(f"dtype {dtype} is not one of torch.{', torch.'.join(DTYPES)}")
    key = str(dtype).strip().lower().removeprefix("torch.")
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise SteerkitError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)} (or bf16, fp16)")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def check_device(device: str | None) -> str:
    """The torch device to use: ``device`` checked (one line naming the fix when it cannot be
    used here), or cuda when available, else cpu. ``"auto"`` (Hugging Face's
    ``device_map="auto"``) needs the accelerate package; no other device does."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.strip().lower() == AUTO_DEVICE:
        if importlib.util.find_spec("accelerate") is None:
            raise SteerkitError("--device auto spreads the model over the GPUs with accelerate, which is not installed: "
                                "pip install accelerate (or give --device cuda or cpu)")
        return AUTO_DEVICE
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise SteerkitError(f"--device {device!r} is not a torch device: use cpu, cuda, cuda:N or mps") from None
    if d.type == "cpu":
        return device
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise SteerkitError(f"--device {device!r}: {why}: use --device cpu, or install a CUDA torch (make setup TORCH=torch)")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise SteerkitError(f"--device {device!r}: there are {n} CUDA device(s) (cuda:0 to cuda:{n - 1}): pick one of them")
        return device
    if d.type == "mps":
        if not torch.backends.mps.is_available():
            raise SteerkitError(f"--device {device!r}: MPS is not available on this machine: use --device cpu")
        return device
    try:
        torch.empty(0, device=d)
    except Exception:
        raise SteerkitError(f"--device {device!r} is not available in this torch ({torch.__version__}): use --device cpu") from None
    return device


def load_model(
    spec: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = torch.float32,
) -> LoadedModel:
    """Load a model and wrap it in a TransformerBridge. Nothing is downloaded for local specs.

    ``dtype``: the weights' dtype (a torch dtype or a name of :data:`DTYPES`; a GGUF is
    dequantized to float32 once and cast from there). ``device="auto"``: placed by accelerate
    (``device_map="auto"``) over the visible GPUs, then CPU RAM.

    A PEFT adapter folder (has ``adapter_config.json``) loads merged into its base model, named
    after the base (see :func:`load_tuned`).
    """
    device = check_device(device)
    dtype = check_dtype(dtype)
    if spec is not None and (Path(str(spec)).expanduser() / "adapter_config.json").is_file():
        return load_tuned(spec, device=device, dtype=dtype)
    name, source = resolve_spec(spec)
    if isinstance(source, Path):
        check_weight_files(source)
    t0 = time.perf_counter()
    tok, hf = load_pretrained(source, device, dtype, hint=" (offline? give a local folder or .gguf file)")
    hf.eval()
    model = wrap_model(hf, tok, name=name, source=str(source))
    log.info("loaded %s in %.1fs", name, time.perf_counter() - t0)
    return model


def load_pretrained(source: Path | str, device: str, dtype: torch.dtype, hint: str = "", attention: str = "eager") -> tuple[Any, torch.nn.Module]:
    """(tokenizer, HF causal LM) of a resolved source in ``dtype`` on ``device`` (a checked one:
    see :func:`check_device`); ``"auto"`` lets accelerate place the layers (``device_map="auto"``).
    The one place a Hugging Face model is loaded. ``attention``: the attention kernel (eager for
    models that are hooked and steered; the judge's reader reads with ``"sdpa"``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = {"device_map": "auto"} if device == AUTO_DEVICE else {}
    with quiet_transformers():
        try:
            tok = AutoTokenizer.from_pretrained(source)
            hf = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, attn_implementation=attention, use_safetensors=True, **placement
            )
        except OSError as e:
            raise SteerkitError(f"could not load model {source}: {str(e).splitlines()[0]}{hint}") from e
        except ImportError as e:  # device_map="auto" without (a recent enough) accelerate
            if not placement:
                raise
            raise SteerkitError(f"could not load model {source} with --device auto ({str(e).splitlines()[0]}): pip install accelerate") from e
    if device != AUTO_DEVICE:
        hf.to(device)
    if device == "cpu" and dtype != torch.float32:
        note = half_precision_note(dtype, *matmul_rates(dtype))
        if note and note not in _NOTED:
            _NOTED.add(note)
            log.warning(note)
    return tok, hf


_NOTED: set[str] = set()


@functools.cache
def matmul_rates(dtype: torch.dtype) -> tuple[float, float]:
    """(float32, ``dtype``) GFLOP/s of a (64 x 576) @ (576 x 576) product on this CPU, best of
    five (a fraction of a second: CPUs without AVX-512 BF16 or AMX run bfloat16 products tens of
    times slower than float32 ones; measured 1.2 against 42 GFLOP/s on an AVX2 EPYC)."""
    rates = []
    for dt in (torch.float32, dtype):
        a, b = torch.randn(64, 576).to(dt), torch.randn(576, 576).to(dt)
        a @ b
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        rates.append(2 * 64 * 576 * 576 / max(best, 1e-9) / 1e9)
    return rates[0], rates[1]


# how much slower than float32 half-precision products must measure before loading says so: well
# past the spread of a best-of-five timing, so a CPU that runs both at about the same speed stays quiet
SLOWER_NOTE_RATIO = 1.5
_FAST_HALF = {torch.bfloat16: "AVX-512 BF16 or AMX", torch.float16: "AVX-512 FP16 or AMX-FP16"}


def half_precision_note(dtype: torch.dtype, fp32_gflops: float, half_gflops: float) -> str | None:
    """One line for a user who asked for ``dtype`` weights on a CPU that multiplies them far more
    slowly than float32 (at least ``SLOWER_NOTE_RATIO`` times; None otherwise): what was measured
    and what to do instead."""
    if half_gflops * SLOWER_NOTE_RATIO > fp32_gflops:
        return None
    name = dtype_name(dtype)
    return (f"{name} matrix products run {fp32_gflops / max(half_gflops, 1e-9):.1f}x slower than float32 on this CPU "
            f"({half_gflops:.1f} vs. {fp32_gflops:.1f} GFLOP/s, measured just now; fast {name} needs {_FAST_HALF.get(dtype, 'CPU support for it')}): "
            f"drop --dtype/--judge-dtype {name} here")


def placed_devices(hf_model: torch.nn.Module) -> set[str]:
    """The devices accelerate spread a ``device_map`` model over (empty for a model on one device)."""
    dm = getattr(hf_model, "hf_device_map", None) or {}
    return {str(v) for v in dm.values()}


def wrap_model(hf_model: torch.nn.Module, tokenizer: Any, name: str, source: str = "") -> LoadedModel:
    """Wrap an already loaded HF causal LM (used by tests with tiny random models, too)."""
    from transformer_lens.model_bridge import TransformerBridge

    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    hf_model.eval()
    # before the bridge wraps hf_model's modules in place; a model spread over several devices
    # keeps the bridge path (the twin would lack accelerate's hooks that move activations)
    twin = _plain_twin(hf_model) if len(placed_devices(hf_model)) <= 1 else None
    with quiet_transformers(), quiet_logging("transformer_lens"):
        # the bridge edits the tokenizer it is given (BOS = EOS when missing): give it a copy
        bridge = TransformerBridge.boot_transformers(
            source or name, hf_model=hf_model, tokenizer=copy.deepcopy(tokenizer)
        )
    _pass_cache_to_bridge_attention(bridge)
    for p in hf_model.parameters():
        p.requires_grad_(False)
    model = LoadedModel(name=name, source=source or name, bridge=bridge, tokenizer=tokenizer, hf_model=hf_model)
    if twin is not None and _twin_matches(model, *twin):
        model.twin, model.twin_layers = twin
    return model


def _pass_cache_to_bridge_attention(bridge: torch.nn.Module) -> None:
    """Hand the KV cache to the bridge's attention wrappers under the name they read.

    transformers 5.24 renamed the attention layers' ``past_key_values`` argument to ``cache``
    (``@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")`` on every decoder
    layer and attention module). transformer-lens 4.3's ``AttentionBridge._update_kv_cache``
    reads only ``past_key_values`` (or ``layer_past``), so under 5.24 the bridge never writes
    the cache: each cached decode step attends to itself alone and ignores the prompt. The
    fault is upstream; this maps the new name onto the old one, on this bridge's own
    attention modules only (no global patch), and is a no-op where the old name still arrives.
    """
    for mod in bridge.modules():
        update = getattr(mod, "_update_kv_cache", None)
        if update is None or getattr(update, "_steerkit_cache_name", False):
            continue

        def renamed(k: torch.Tensor, v: torch.Tensor, _update: Any = update, **kwargs: Any) -> Any:
            if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
                kwargs["past_key_values"] = kwargs["cache"]
            return _update(k, v, **kwargs)

        renamed._steerkit_cache_name = True  # type: ignore[attr-defined]
        object.__setattr__(mod, "_update_kv_cache", renamed)


def _plain_twin(hf_model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.ModuleList] | None:
    """A second module tree of ``hf_model``'s class that shares its parameters and buffers (no
    copy), and its list of decoder layers; None where that cannot be built."""
    n = int(getattr(hf_model.config, "num_hidden_layers", 0) or 0)
    try:
        with torch.device("meta"):
            twin = type(hf_model)(copy.deepcopy(hf_model.config))
        twin.load_state_dict(hf_model.state_dict(keep_vars=True), assign=True, strict=True)
        for name, buf in hf_model.named_buffers():  # non-persistent buffers (rotary frequencies)
            mod, _, attr = name.rpartition(".")
            twin.get_submodule(mod)._buffers[attr] = buf
        if any(t.is_meta for t in list(twin.parameters()) + list(twin.buffers())):
            return None
        twin.eval()
        twin.generation_config = hf_model.generation_config
        prepare_twin(twin)
    except Exception:  # an architecture we cannot rebuild this way: keep the bridge path
        return None
    layers = [m for m in twin.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    return (twin, layers[0]) if n and len(layers) == 1 else None


@torch.inference_mode()
def _twin_matches(model: LoadedModel, twin: torch.nn.Module, layers: torch.nn.ModuleList) -> bool:
    """The twin is used only where its last layer's output and its logits equal the bridge's."""
    ids = torch.arange(1, 6, device=model.device)[None] % int(model.hf_model.config.vocab_size)
    got: list[torch.Tensor] = []
    h = layers[-1].register_forward_hook(lambda m, a, o: got.append(o[0] if isinstance(o, tuple) else o))
    try:
        want_h = residuals(model, ids, len(layers) - 1)
        want = model.hf_model(input_ids=ids, use_cache=False).logits
        logits = twin(input_ids=ids, use_cache=False).logits
    except Exception:
        return False
    finally:
        h.remove()
    return (len(got) == 1 and torch.allclose(got[0].float(), want_h, atol=1e-4, rtol=1e-4)
            and torch.allclose(logits, want, atol=1e-4, rtol=1e-4))


# --- tuned models: LoRA adapters merged into their base ---------------------------------------


def load_hf(spec: str | os.PathLike | None, device: str | None = None, dtype: str | torch.dtype | None = torch.float32) -> tuple[str, Any, Any, str]:
    """A fresh, unwrapped HF model for a spec: (short name, model, tokenizer, source), in
    ``dtype`` on ``device`` (``"auto"``: placed by accelerate, see :func:`load_pretrained`)."""
    device = check_device(device)
    dtype = check_dtype(dtype)
    name, source = resolve_spec(spec)
    if isinstance(source, Path):
        check_weight_files(source)
    tok, hf = load_pretrained(source, device, dtype)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return name, hf, tok, str(source)


def load_tuned(spec: str | os.PathLike, base: str | None = None, device: str | None = None, dtype: str | torch.dtype | None = torch.float32) -> LoadedModel:
    """A tuned model as a LoadedModel named after its base (so the base's directions apply).

    ``spec`` is a PEFT LoRA adapter folder (its weights are merged into a fresh copy of the base:
    ``base``, else the adapter's ``base_model_name_or_path``) or anything :func:`load_model`
    takes (a full model folder, .gguf, hub id); then ``base``, when given, only names it.
    """
    device = check_device(device)
    dtype = check_dtype(dtype)
    if not is_adapter_dir(spec):
        lm = load_model(spec, device=device, dtype=dtype)
        if base is not None:
            lm.name = canonical_name(base)
            src = resolve_spec(spec)[1]
            if isinstance(src, Path) and lm.name != resolve_spec(spec)[0]:
                lm.tuned = tuned_info(src, list(src.glob("*.safetensors")))
        return lm
    folder = Path(str(spec)).expanduser().resolve()
    base_spec = check_adapter(folder, None if base is None else adapter_base_spec(base))
    try:
        from peft import PeftModel
    except ImportError:
        raise SteerkitError("loading an adapter needs the peft package: pip install 'steerkit[train]'") from None
    try:
        name, hf, tok, source = load_hf(base_spec, device, dtype)
    except SteerkitError as e:
        if base is not None:
            raise
        raise SteerkitError(f"{e}; the base model is named in {folder / ADAPTER_CONFIG}: set base_model_name_or_path there, or pass --base") from None
    try:
        with warnings.catch_warnings():  # PEFT calls a transformers API deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            merged = PeftModel.from_pretrained(hf, str(folder)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as e:
        raise SteerkitError(f"adapter {folder} does not fit base model {base_spec} ({str(e).splitlines()[0][:200]}): pass the right --base") from e
    lm = wrap_model(merged, tok, name=name, source=source)
    lm.source = f"{folder} (LoRA adapter merged into {base_spec})"
    lm.tuned = tuned_info(folder, list(folder.glob("adapter_model*.safetensors")))
    return lm
