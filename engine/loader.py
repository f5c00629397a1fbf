"""Build a model from a checkpoint folder: config.json + safetensors.

The model is built on the meta device (no memory, no init), then each parameter
is replaced by its checkpoint tensor, cast and moved once. Every parameter must
be filled exactly once with the shape the config implies; anything else in the
checkpoint is an error, so a mismatched checkpoint fails at start-up, not with
wrong text.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.gguf import is_gguf_path
from engine.layers.linear import Linear
from engine.models import get_model_class
from engine.quantization.base import QuantConfig, QuantFormatError, TensorSet
from engine.tensor_files import STATE_DICT_SUFFIXES, open_tensor_file, reading_checkpoint

log = logging.getLogger(__name__)

# Tensors some checkpoints carry that the model computes itself.
_HARMLESS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# The fp8 KV-cache scales, which ``engine.kv_setup.load_kv_scales`` reads:
# self_attn.k_scale / v_scale / kv_scale, also under the projection (k_proj.k_scale), and
# AutoFP8's k_proj.output_scale / v_proj.output_scale
KV_SCALE_NAME = re.compile(
    r"^model\.layers\.(\d+)\.self_attn\.(?:([kv])_proj\.)?(k_scale|v_scale|kv_scale|output_scale)$"
)
_MAX_LISTED = 10


@reading_checkpoint()  # listing a state dict's names and reading its tensors: one unpickling
def load_model(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    config: ModelConfig | None = None,
    quant: QuantConfig | None = None,
) -> torch.nn.Module:
    """Load the checkpoint at ``path`` into our model, in ``dtype`` on ``device``; the linear
    layers that ``quant`` quantizes read their own tensors (``QuantLinearMethod.load``)."""
    started = time.monotonic()
    path = Path(path)
    if is_gguf_path(path):  # a GGUF file carries its own quantization (engine.gguf)
        if quant is not None:
            raise QuantFormatError(f"{path}: a GGUF file carries its own quantization")
        from engine.gguf.load import load_gguf_model

        return load_gguf_model(path, dtype, device, config)[0]
    config = config or ModelConfig.from_pretrained(path)
    with torch.device("meta"):
        model = get_model_class(config.architecture)(config, quant)
    params = dict(model.named_parameters())  # tied lm_head.weight appears once, as the embedding
    quant_layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear) and m.quantized}
    tensor_files = checkpoint_tensor_files(path)
    layer_of = {n: None if KV_SCALE_NAME.match(n) else _owning_layer(n, quant_layers)
                for n in tensor_files}
    _check_names(params, {n: f for n, f in tensor_files.items() if layer_of[n] is None}, config, path)

    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, file in tensor_files.items():
        if name in params or layer_of[name] is not None:
            by_file[file].append(name)
    layer_tensors: dict[str, dict[str, torch.Tensor]] = {n: {} for n in quant_layers}
    nbytes = 0
    for file, names in by_file.items():
        with open_tensor_file(file) as fh:
            available = set(fh.names())
            for name in names:
                if name not in available:
                    raise ValueError(
                        f"{file}: the index lists tensor {name!r} but the file lacks it"
                    )
                owner = layer_of[name]
                if owner is not None:
                    layer_tensors[owner][name[len(owner) + 1 :]] = fh.get(name)
                    continue
                expected = tuple(params[name].shape)
                actual = fh.shape(name)
                if actual != expected:
                    raise ValueError(
                        f"{file.name}: tensor {name!r} has shape {list(actual)}, but "
                        f"{path / 'config.json'} implies {list(expected)}"
                    )
                tensor = fh.get(name)
                tensor = tensor.to(
                    device=device, dtype=dtype if tensor.is_floating_point() else None
                )
                _assign(model, name, tensor)
                nbytes += tensor.numel() * tensor.element_size()

    for prefix, layer in quant_layers.items():
        tensors = TensorSet(prefix, layer_tensors.pop(prefix))
        try:
            layer.quant_method.load(layer, tensors, torch.device(device), dtype)
            tensors.finish()
        except QuantFormatError as exc:
            raise QuantFormatError(f"checkpoint {path} ({quant.describe()}): {exc}") from exc
        nbytes += sum(t.numel() * t.element_size() for t in layer.buffers())

    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    assert not still_meta, f"parameters left unfilled: {still_meta}"
    model.eval()
    fp16_bytes = 2 * sum(t.numel() for t in _unique_params(model)) + 2 * sum(
        m.in_features * m.out_features + (m.out_features if m.has_bias else 0)
        for m in quant_layers.values()
    )
    log.info(
        "loaded %s (%s, %d layers) from %s: weights %.1f MiB as %s%s on %s (%.2f of the "
        "%.1f MiB they take in fp16) in %.2fs",
        config.architecture,
        config.torch_dtype,
        config.num_layers,
        path,
        nbytes / 2**20,
        dtype,
        f", {quant.describe()}" if quant is not None else "",
        device,
        nbytes / fp16_bytes,
        fp16_bytes / 2**20,
        time.monotonic() - started,
    )
    return model


def _unique_params(model: torch.nn.Module) -> list[torch.Tensor]:
    return list({id(p): p for p in model.parameters()}.values())


def _owning_layer(name: str, quant_layers: dict[str, Linear]) -> str | None:
    """The quantized layer whose tensor ``name`` is (``...q_proj`` of ``...q_proj.qweight``,
    also of ``...q_proj.weight.absmax``), or None."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in quant_layers:
            return prefix
    return None


def checkpoint_tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file: from the safetensors index, ``model.safetensors``, every
    ``*.safetensors`` in the folder, or else every PyTorch state dict (``*.pt``, ``*.bin``,
    ``*.pth``: SqueezeLLM's released models, older folders); a name found in two files is
    an error."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: not a valid safetensors index ({exc})") from exc
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to file names")
        files = {name: path / str(fname) for name, fname in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise ValueError(f"{index} refers to {file.name}, which is missing")
        return files
    single = path / "model.safetensors"
    candidates = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
    if not candidates:
        candidates = sorted(f for f in path.iterdir() if f.suffix in STATE_DICT_SUFFIXES)
    if not candidates:
        raise ValueError(f"no model.safetensors (or *.safetensors, *.pt, *.bin) in {path}")
    files: dict[str, Path] = {}
    for file in candidates:
        with open_tensor_file(file) as fh:
            for name in fh.names():
                if name in files:
                    raise ValueError(
                        f"tensor {name!r} is in both {files[name].name} and {file.name}"
                    )
                files[name] = file
    return files


def _check_names(
    params: dict[str, torch.nn.Parameter],
    tensor_files: dict[str, Path],
    config: ModelConfig,
    path: Path,
) -> None:
    def ignored(name: str) -> bool:
        # A tied checkpoint may still store lm_head.weight; like transformers, use the embedding.
        tied_head = config.tie_word_embeddings and name == "lm_head.weight"
        return tied_head or bool(_HARMLESS.search(name) or KV_SCALE_NAME.match(name))

    missing = sorted(set(params) - set(tensor_files))
    unexpected = sorted(n for n in tensor_files if n not in params and not ignored(n))
    problem = tensor_name_problem(missing, unexpected)
    if problem:
        raise ValueError(f"checkpoint {path} does not match its config ({config.architecture}, "
                         f"{config.num_layers} layers): {problem}")


def tensor_name_problem(missing: list[str], unexpected: list[str]) -> str | None:
    """What a checkpoint lacks and holds beyond its config, listed briefly; None if nothing."""
    problems = []
    if missing:
        problems.append(f"missing tensors {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_listed(unexpected)}")
    return "; ".join(problems) or None


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return f"[{shown}{f', ... {more} more' if more > 0 else ''}]"


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))
