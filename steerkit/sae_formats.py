"""SAE folders in the other published layouts, read into steerkit's :class:`~steerkit.sae.SAE`.

:func:`steerkit.sae.load_sae` calls :func:`locate` to find out which layout a folder holds:

``saelens``
    ``cfg.json`` + ``sae_weights.safetensors``; read by :func:`steerkit.sae.load_sae` itself.

``sparsify`` (EleutherAI)
    One folder per hookpoint (``layers.15``, ``layers.15.mlp``, ``embed_tokens`` ...) with
    ``cfg.json`` (``d_in``, ``k``, ``num_latents`` or ``expansion_factor``, ``activation``,
    ``multi_topk``, ``skip_connection``, ``transcode``, ``normalize_decoder``) and
    ``sae.safetensors`` (``encoder.weight [L, d_in]``, ``encoder.bias [L]``, ``W_dec [L, d_in]``,
    ``b_dec [d_in]``; ``W_skip [d_in, d_in]`` with a skip connection). A TopK SAE::

        a     = topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias), k)
        x_hat = a @ W_dec + b_dec

    so ``W_enc = encoder.weight.T``, ``apply_b_dec_to_input`` true, ``k`` as is; ``multi_topk``
    only changes the training loss. Hookpoint ``layers.N`` (``h.N`` on GPT-2) is the output of
    decoder layer N: the residual stream after block N, ``blocks.N.hook_out``. Transcoders,
    skip connections, GroupMax or signed activations and SAEs on a submodule (``layers.N.mlp``)
    or the embeddings are refused: steerkit steers with SAEs that reconstruct the residual stream.
    A parent folder of hookpoint folders is refused with the list of its hookpoints.

``dictionary_learning`` (saprmarks)
    ``config.json`` (``{"trainer": {"dict_class", "activation_dim", "dict_size", "k", "layer",
    "lm_name", "submodule_name", ...}, "buffer": {"io", ...}}``) + ``ae.pt``, the dictionary's
    ``state_dict`` written by ``torch.save``. It is read with ``torch.load(weights_only=True)``
    only: a file that would need code to unpickle is refused. Classes (``nn.Linear`` layouts are
    ``encoder.weight [dict_size, activation_dim]``, ``decoder.weight [activation_dim, dict_size]``):

    * ``AutoEncoder`` (ReLU): ``relu(encoder(x - bias))``, ``decoder(f) + bias`` -> ``relu`` with
      ``b_dec = bias``; decoder columns are made unit norm as its ``from_pretrained`` does.
    * ``AutoEncoderNew``: ``relu(encoder(x))``, ``decoder(f)`` with ``decoder.bias`` -> ``relu``,
      ``b_dec`` not subtracted from the input.
    * ``AutoEncoderTopK``: ``topk(relu(encoder(x - b_dec)), k)`` with buffer ``k`` -> ``topk``.
    * ``BatchTopKSAE`` and ``MatryoshkaBatchTopKSAE`` (``W_enc``/``W_dec`` parameters): at
      inference ``f * (f > threshold)`` with ``f = relu(pre)`` and one learned scalar ``threshold``
      -> ``jumprelu`` with that threshold on every latent (as ``steerkit sae train --arch
      batchtopk`` saves them).
    * ``JumpReluAutoEncoder``: ``relu(pre * (pre > threshold))``, ``b_dec`` not subtracted ->
      ``jumprelu``.
    * ``GatedAutoEncoder``: gate ``x_enc + gate_bias > 0`` times ``relu(exp(r_mag) x_enc +
      mag_bias)`` with ``x_enc = encoder(x - decoder_bias)`` is exactly ``jumprelu`` with
      ``W_enc = (exp(r_mag) * encoder.weight).T``, ``b_enc = mag_bias`` and ``threshold =
      mag_bias - exp(r_mag) * gate_bias``.

    Crosscoders (several layers or models at once) and buffers that map a submodule's input to
    its output are refused. ``layer`` with buffer ``io: "out"`` (the default) is the residual
    stream after block ``layer`` (``io: "in"``: after block ``layer - 1``); a ``submodule_name``
    (or, in older configs without one, a folder name) naming an MLP, attention or embedding
    output is refused.

The loaded SAE carries ``source_format`` (one of :data:`FORMATS`) and, for the two foreign
layouts, ``cfg.extra["source"]`` with what it was converted from.

Why one module of this size: one short reader per published layout, sharing the table that
detects the layout; a module per layout would be a dozen small files.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from steerkit.errors import SteerkitError
from steerkit.sae_core import SAE, SAEConfig

FORMATS: tuple[str, ...] = ("saelens", "sparsify", "dictionary_learning")
LAYOUT_FILES = {
    "saelens": ("cfg.json", "sae_weights.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
    "dictionary_learning": ("config.json", "ae.pt"),
}
LAYOUTS = "SAELens (cfg.json + sae_weights.safetensors), sparsify (cfg.json + sae.safetensors) or dictionary_learning (config.json + ae.pt)"
_KNOWN_FILES = {name for files in LAYOUT_FILES.values() for name in files}


def residual_hook(layer: int) -> str:
    """The hook name steerkit gives the residual stream after block ``layer`` (as
    :meth:`steerkit.models.LoadedModel.hook_name` does)."""
    return f"blocks.{layer}.hook_out"


# --- finding the folder -----------------------------------------------------------------------


def detect_format(folder: str | os.PathLike) -> str | None:
    """``saelens``, ``sparsify`` or ``dictionary_learning`` from the files in ``folder``; None
    when it holds none of the three layouts."""
    f = Path(folder)
    for fmt in FORMATS:
        if all((f / name).is_file() for name in LAYOUT_FILES[fmt]):
            return fmt
    return None


def sae_folders_below(folder: str | os.PathLike, depth: int = 2) -> list[tuple[str, str]]:
    """(path relative to ``folder``, format) of the SAE folders below ``folder``, up to
    ``depth`` levels down, naturally sorted (``layers.2`` before ``layers.10``)."""
    root = Path(folder)
    found: list[tuple[str, str]] = []
    level = [root]
    for _ in range(depth):
        nxt = []
        for d in level:
            try:
                subs = [p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")]
            except OSError:
                continue
            for p in subs:
                fmt = detect_format(p)
                if fmt is not None:
                    found.append((p.relative_to(root).as_posix(), fmt))
                else:
                    nxt.append(p)
        level = nxt
    return sorted(found, key=lambda t: [int(s) if i % 2 else s for i, s in enumerate(re.split(r"([0-9]+)", t[0]))])


def locate(path: str | os.PathLike) -> tuple[Path, str]:
    """(folder, format) of the SAE at ``path`` (a folder, or one of its files), or a one-line
    :class:`SteerkitError` that names the three layouts, or the SAE folders below ``path``."""
    folder = Path(path).expanduser()
    if folder.is_file() and folder.name in _KNOWN_FILES:
        folder = folder.parent
    if not folder.is_dir():
        raise SteerkitError(f"SAE folder {folder} does not exist")
    fmt = detect_format(folder)
    if fmt is not None:
        return folder, fmt
    below = sae_folders_below(folder)
    if below:
        names = [n for n, _ in below]
        kinds = sorted({k for _, k in below})
        shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
        example = next((n for n in names if re.search(r"(?:^|[./_])(?:layers|h)\.15$", n)), names[len(names) // 2])
        raise SteerkitError(
            f"{folder} holds {len(names)} {' and '.join(kinds)} SAE folders ({shown}): name one, e.g. {folder / example}"
        )
    def has(name: str) -> bool:
        return (folder / name).is_file()

    if has("cfg.json"):
        missing = "cfg.json is there but neither sae_weights.safetensors (SAELens) nor sae.safetensors (sparsify)"
    elif has("config.json") and not has("ae.pt"):
        missing = "config.json is there but ae.pt is missing (dictionary_learning)"
    elif has("ae.pt"):
        missing = "ae.pt is there but config.json is missing (dictionary_learning)"
    else:
        missing = "cfg.json is missing"
    raise SteerkitError(f"{folder} is not an SAE folder: {missing}; steerkit reads {LAYOUTS} folders")


def load_foreign(folder: str | os.PathLike, fmt: str) -> SAE:
    """A ``sparsify`` or ``dictionary_learning`` folder as a steerkit SAE (on the CPU, no grad)."""
    if fmt == "sparsify":
        sae = load_sparsify(folder)
    elif fmt == "dictionary_learning":
        sae = load_dictionary_learning(folder)
    else:
        raise SteerkitError(f"SAE format {fmt!r} is not one of sparsify, dictionary_learning")
    sae.requires_grad_(False)
    sae.source_format = fmt
    return sae


# --- shared helpers ---------------------------------------------------------------------------


def _read_json(p: Path) -> dict[str, Any]:
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SteerkitError(f"{p} is not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SteerkitError(f"{p} cannot be read ({e.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise SteerkitError(f"{p}: expected a JSON object")
    return raw


def _int(raw: dict[str, Any], key: str, where: str, default: Any = None) -> int | None:
    v = raw.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or float(v) != int(v):
        raise SteerkitError(f"{where}: {key} {v!r} is not a whole number")
    return int(v)


def _check_shapes(w: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]], where: str) -> None:
    for name, shape in want.items():
        if name not in w:
            raise SteerkitError(f"{where}: tensor {name!r} is missing (has {', '.join(sorted(w))})")
        if tuple(w[name].shape) != shape:
            raise SteerkitError(f"{where}: {name} has shape {tuple(w[name].shape)}, expected {shape}")


def _build(cfg: SAEConfig, tensors: dict[str, torch.Tensor]) -> SAE:
    sae = SAE(cfg)
    with torch.no_grad():
        for name, t in tensors.items():
            getattr(sae, name).copy_(t.detach().float())
    return sae


# --- sparsify ---------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"^(?:.*\.)?(?:layers|layer|h|blocks)\.(\d+)(?:\.(.+))?$")
_EMBED_RE = re.compile(r"^(?:.*\.)?(?:embed_tokens|embed_in|wte|embed|embeddings)$")


def sparsify_hook(hookpoint: str, where: str) -> str | None:
    """steerkit's hook name for a sparsify hookpoint (its folder name): ``layers.N`` -> the
    residual stream after block N; None when the name says nothing; an error when it names a
    submodule or the embeddings."""
    m = _LAYER_RE.match(hookpoint)
    if m and m.group(2) is None:
        return residual_hook(int(m.group(1)))
    if m:
        raise SteerkitError(
            f"{where}: sparsify hookpoint {hookpoint!r} reads {m.group(2)!r} inside layer {m.group(1)}, not the residual stream; "
            "steerkit steers with residual-stream SAEs (hookpoints layers.N)"
        )
    if _EMBED_RE.match(hookpoint):
        raise SteerkitError(f"{where}: sparsify hookpoint {hookpoint!r} reads the embeddings; steerkit steers the residual stream after a block (hookpoints layers.N)")
    return None


def load_sparsify(folder: str | os.PathLike) -> SAE:
    """An EleutherAI sparsify hookpoint folder (``cfg.json`` + ``sae.safetensors``) as a TopK SAE."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / "cfg.json", folder / "sae.safetensors"
    where = str(cfg_path)
    raw = _read_json(cfg_path)
    if raw.get("transcode"):
        raise SteerkitError(f"{where}: this is a sparsify transcoder (transcode: true), which reads a module's input and writes its output; steerkit loads SAEs only")
    if raw.get("skip_connection"):
        raise SteerkitError(f"{where}: this sparsify SAE has a skip connection (W_skip), which steerkit's SAEs cannot express")
    if raw.get("signed"):
        raise SteerkitError(f"{where}: this sparsify SAE is signed (top-k by absolute value, no ReLU), which steerkit's SAEs cannot express")
    activation = str(raw.get("activation", "topk"))
    if activation != "topk":
        raise SteerkitError(f"{where}: sparsify activation {activation!r} is not supported (steerkit reads topk)")
    d_in = _int(raw, "d_in", where)
    if d_in is None or d_in <= 0:
        raise SteerkitError(f"{where}: needs a positive integer 'd_in'")
    k = _int(raw, "k", where, 32)  # sparsify's defaults for keys a config leaves out
    num_latents = _int(raw, "num_latents", where, 0) or d_in * (_int(raw, "expansion_factor", where, 32) or 0)
    try:
        w = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise SteerkitError(f"{w_path} is not a readable safetensors file ({e})") from None
    if "W_skip" in w:
        raise SteerkitError(f"{w_path}: this sparsify SAE has a skip connection (W_skip), which steerkit's SAEs cannot express")
    if "W_dec" not in w and "encoder.weight" in w:
        raise SteerkitError(f"{w_path}: this sparsify file has no decoder (W_dec): it was saved encoder-only")
    _check_shapes(w, {"encoder.weight": (num_latents, d_in), "encoder.bias": (num_latents,), "W_dec": (num_latents, d_in), "b_dec": (d_in,)}, str(w_path))
    src = {"format": "sparsify", "hookpoint": folder.name, "k": k, "multi_topk": bool(raw.get("multi_topk", False)),
           "normalize_decoder": bool(raw.get("normalize_decoder", True)), "dtype": str(w["W_dec"].dtype).replace("torch.", "")}
    cfg = SAEConfig(
        architecture="topk",
        d_in=d_in,
        d_sae=num_latents,
        k=k,
        hook_name=sparsify_hook(folder.name, where),
        model_name=None,  # sparsify folders do not name their model
        apply_b_dec_to_input=True,  # encode subtracts b_dec unless transcoding (refused above)
        extra={"source": src},
    )
    return _build(cfg, {"W_enc": w["encoder.weight"].T, "b_enc": w["encoder.bias"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]})


# --- dictionary_learning ----------------------------------------------------------------------

DL_CLASSES = ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder", "GatedAutoEncoder")


def read_state_dict(p: Path) -> dict[str, torch.Tensor]:
    """``torch.load(p, weights_only=True)``: tensors and plain containers only, never code."""
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if m or zipfile.is_zipfile(p):
            what = f" ({m.group(1)})" if m else ""
            raise SteerkitError(
                f"{p} needs code to unpickle{what}; steerkit reads it with torch.load(weights_only=True) only: "
                "save the dictionary's state_dict instead (torch.save(ae.state_dict(), 'ae.pt'))"
            ) from None
        raise SteerkitError(f"{p} is not a readable torch file (torch.load with weights_only=True failed)") from None
    except Exception as e:  # a damaged file surfaces as any of several error types
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise SteerkitError(f"{p} is not a readable torch file ({e.__class__.__name__}{': ' + first if first else ''})") from None
    if not isinstance(obj, dict):
        raise SteerkitError(f"{p} holds a {type(obj).__name__}, not a state_dict of tensors")
    if isinstance(obj.get("ae"), dict) and "optimizer" in obj:
        raise SteerkitError(
            f"{p} is a dictionary_learning training backup (step {obj.get('step')}, with optimizer state), not a finished dictionary: "
            "finish the run, or use a checkpoints/ae_STEP.pt file as ae.pt"
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise SteerkitError(f"{p}: entry {bad[0]!r} is not a tensor (a dictionary_learning ae.pt is a state_dict of tensors)")
    return obj


def _infer_dict_class(w: dict[str, torch.Tensor], trainer: dict[str, Any]) -> str | None:
    """The dictionary class of an older config without ``dict_class``, from its tensor names."""
    keys = set(w)
    if "r_mag" in keys:
        return "GatedAutoEncoder"
    if "group_sizes" in keys:
        return "MatryoshkaBatchTopKSAE"
    if "W_enc" in keys and "threshold" in keys and w["threshold"].dim() == 1:
        return "JumpReluAutoEncoder"
    if "k" in keys and "encoder.weight" in keys:
        return "BatchTopKSAE" if "BatchTopK" in str(trainer.get("trainer_class", "")) else "AutoEncoderTopK"
    if "decoder.bias" in keys:
        return "AutoEncoderNew"
    if {"bias", "encoder.weight", "decoder.weight"} <= keys:
        return "AutoEncoder"
    return None


_NON_RESID_RE = re.compile(r"mlp|attn|attention|embed", re.I)
_LAYER_NUM_RE = re.compile(r"layers?[._]?(\d+)", re.I)


def _dl_layer(trainer: dict[str, Any], buffer: dict[str, Any], folder: Path, where: str) -> tuple[int | None, dict[str, Any]]:
    """The residual layer a dictionary_learning SAE reads, from the trainer's ``layer`` and
    ``submodule_name`` and the buffer's ``io``; refuses non-residual sites."""
    io = str(buffer.get("io") or "out")
    if io not in ("out", "in"):
        raise SteerkitError(f"{where}: buffer io {io!r} maps a submodule's input to its output (a transcoder); steerkit loads SAEs only")
    sub = trainer.get("submodule_name")
    names = [str(sub)] if sub else [folder.name, folder.parent.name]  # older configs: the folder says
    for n in names:
        if _NON_RESID_RE.search(n):
            what = "submodule_name" if sub else "folder name"
            raise SteerkitError(
                f"{where}: {what} {n!r} is not the residual stream; steerkit steers with residual-stream SAEs "
                "(dictionary_learning: a decoder layer's output, e.g. resid_post_layer_N)"
            )
    layer = trainer.get("layer")
    if not (isinstance(layer, int) and not isinstance(layer, bool)):
        layer = next((int(m.group(1)) for n in names if (m := _LAYER_NUM_RE.search(n))), None)
    if layer is not None and io == "in":
        if layer == 0:
            raise SteerkitError(f"{where}: this SAE reads the input of layer 0 (the embeddings); steerkit steers the residual stream after a block")
        layer -= 1  # a decoder layer's input is the previous layer's output
    info = {"layer": trainer.get("layer"), "submodule_name": sub, "io": io}
    return layer, info


def load_dictionary_learning(folder: str | os.PathLike) -> SAE:
    """A saprmarks/dictionary_learning folder (``config.json`` + ``ae.pt``) as a steerkit SAE."""
    folder = Path(folder)
    cfg_path, ae_path = folder / "config.json", folder / "ae.pt"
    where = str(cfg_path)
    raw = _read_json(cfg_path)
    trainer = raw.get("trainer")
    if not isinstance(trainer, dict):
        raise SteerkitError(f"{where}: no 'trainer' block, so this is not a dictionary_learning config (it writes {{\"trainer\": ..., \"buffer\": ...}})")
    buffer = raw.get("buffer") if isinstance(raw.get("buffer"), dict) else {}
    dict_class = trainer.get("dict_class")
    if isinstance(dict_class, str) and "crosscoder" in dict_class.lower():
        raise SteerkitError(f"{where}: {dict_class} is a crosscoder (it encodes several layers or models at once); steerkit loads single-site SAEs only")
    w = read_state_dict(ae_path)
    enc = w.get("encoder.weight", w.get("W_enc"))
    if isinstance(enc, torch.Tensor) and enc.dim() == 3:
        raise SteerkitError(f"{ae_path}: a 3-d encoder {tuple(enc.shape)} is a crosscoder's (several layers or models at once); steerkit loads single-site SAEs only")
    if not dict_class:
        dict_class = _infer_dict_class(w, trainer)
    if dict_class not in DL_CLASSES:
        raise SteerkitError(f"{where}: dictionary class {dict_class!r} is not supported (steerkit reads {', '.join(DL_CLASSES)})")

    # sizes: from the tensors, checked against the config where it gives them
    if dict_class in ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"):
        shape = tuple(w["W_enc"].shape) if "W_enc" in w else None
        d_in, d_sae = shape if shape and len(shape) == 2 else (None, None)
    else:
        shape = tuple(w["encoder.weight"].shape) if "encoder.weight" in w else None
        d_sae, d_in = shape if shape and len(shape) == 2 else (None, None)
    if d_in is None or d_sae is None:
        raise SteerkitError(f"{ae_path}: no 2-d encoder weight for a {dict_class} (has {', '.join(sorted(w))})")
    for key, got in (("activation_dim", d_in), ("dict_size", d_sae)):
        v = _int(trainer, key, where)
        if v is not None and v != got:
            raise SteerkitError(f"{ae_path}: the weights have {key} {got}, but config.json says {v}")

    layer, src = _dl_layer(trainer, buffer, folder, where)
    src = {"format": "dictionary_learning", "dict_class": dict_class, "trainer_class": trainer.get("trainer_class"), **src}
    common = dict(d_in=d_in, d_sae=d_sae, hook_name=residual_hook(layer) if layer is not None else None,
                  model_name=trainer.get("lm_name"))
    lin = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "decoder.weight": (d_in, d_sae)}
    par = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    fold, k = False, None
    if dict_class == "AutoEncoder":
        _check_shapes(w, {**lin, "bias": (d_in,)}, str(ae_path))
        arch, t = "relu", {"W_enc": w["encoder.weight"].T, "b_enc": w["encoder.bias"], "W_dec": w["decoder.weight"].T, "b_dec": w["bias"]}
        apply_b_dec, fold = True, True  # AutoEncoder.from_pretrained normalises decoder columns by default
    elif dict_class == "AutoEncoderNew":
        _check_shapes(w, {**lin, "decoder.bias": (d_in,)}, str(ae_path))
        arch, t = "relu", {"W_enc": w["encoder.weight"].T, "b_enc": w["encoder.bias"], "W_dec": w["decoder.weight"].T, "b_dec": w["decoder.bias"]}
        apply_b_dec = False
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        mat = dict_class == "MatryoshkaBatchTopKSAE"
        _check_shapes(w, par if mat else {**lin, "b_dec": (d_in,)}, str(ae_path))
        ck = _int(trainer, "k", where)
        k = int(w["k"].item()) if "k" in w and w["k"].numel() == 1 else ck  # before Dec 2024 k was not saved
        if k is None:
            raise SteerkitError(f"{where}: a {dict_class} needs k: neither ae.pt (buffer k) nor the trainer block gives it")
        if ck is not None and ck != k:
            raise SteerkitError(f"{ae_path}: the weights have k {k}, but config.json says {ck}")
        thr = float(w["threshold"].item()) if "threshold" in w and w["threshold"].numel() == 1 else None
        if mat:
            t = {"W_enc": w["W_enc"], "b_enc": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
            src["group_sizes"] = [int(s) for s in w["group_sizes"].tolist()] if "group_sizes" in w else None
        else:
            t = {"W_enc": w["encoder.weight"].T, "b_enc": w["encoder.bias"], "W_dec": w["decoder.weight"].T, "b_dec": w["b_dec"]}
        src.update(k=k, threshold=thr)
        apply_b_dec = True
        if dict_class == "AutoEncoderTopK":
            arch = "topk"  # encode's default keeps the k largest; the threshold is an opt-in alternative
        else:
            # BatchTopK at inference: relu(pre) * (relu(pre) > threshold), the same as steerkit's
            # jumprelu pre * (pre > threshold) * (pre > 0) for any threshold (also the untrained -1)
            if thr is None:
                raise SteerkitError(
                    f"{ae_path}: this {dict_class} has no learned threshold (saved before dictionary_learning tracked one), "
                    "so its encoding depends on the whole batch; steerkit needs the per-token threshold"
                )
            if not math.isfinite(thr):
                raise SteerkitError(f"{ae_path}: threshold {thr} is not a finite number")
            arch = "jumprelu"
            t["threshold"] = torch.full((d_sae,), thr)
    elif dict_class == "JumpReluAutoEncoder":
        _check_shapes(w, {**par, "threshold": (d_sae,)}, str(ae_path))
        arch, t = "jumprelu", {n: w[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
        apply_b_dec = False  # the class sets apply_b_dec_to_input = False and does not save it
    else:  # GatedAutoEncoder: exactly a JumpReLU SAE (see the module docstring)
        _check_shapes(w, {"encoder.weight": (d_sae, d_in), "decoder.weight": (d_in, d_sae), "decoder_bias": (d_in,),
                          "r_mag": (d_sae,), "gate_bias": (d_sae,), "mag_bias": (d_sae,)}, str(ae_path))
        scale = w["r_mag"].float().exp()
        arch = "jumprelu"
        t = {"W_enc": (w["encoder.weight"].float() * scale[:, None]).T, "b_enc": w["mag_bias"], "W_dec": w["decoder.weight"].T,
             "b_dec": w["decoder_bias"], "threshold": w["mag_bias"].float() - scale * w["gate_bias"].float()}
        apply_b_dec = True
    cfg = SAEConfig(architecture=arch, k=k if arch == "topk" else None, apply_b_dec_to_input=apply_b_dec,  # type: ignore[arg-type]
                    extra={"source": src}, **common)  # type: ignore[arg-type]
    sae = _build(cfg, t)
    if fold:
        sae.fold_decoder_norm()
    return sae


__all__ = ["FORMATS", "LAYOUTS", "LAYOUT_FILES", "detect_format", "locate", "load_foreign", "load_sparsify", "load_dictionary_learning",
           "read_state_dict", "sae_folders_below", "sparsify_hook", "residual_hook"]
