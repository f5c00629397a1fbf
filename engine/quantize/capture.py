"""Run the model one decoder layer at a time on the calibration tokens and see what each
linear layer reads.

The model is transformers' ``AutoModelForCausalLM`` (Llama family) loaded on the CPU in
its own dtype; the embedding, the rotary table and the layer being processed run in
float32 on ``device``. The first layer's inputs (hidden states and the keyword arguments
the model passes every layer: position embeddings, mask) are caught by a hook that stops
the forward there; from then on ``run_layer`` feeds each layer's outputs to the next, so
only one layer is ever upcast and only one layer's activations are kept.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.loader import checkpoint_tensor_files
from engine.quantize.gptq import HessianAccumulator
from engine.tensor_files import open_tensor_file, reading_checkpoint

log = logging.getLogger(__name__)


@dataclass
class LayerBatch:
    hidden: torch.Tensor  # [B, L, hidden] float32 on the device
    kwargs: dict[str, Any]


@dataclass
class LinearStats:
    """What the quantizer needs of one linear layer's inputs; layers that read the same
    tensor (q/k/v, gate/up) share one object."""

    keep_inputs: bool = False
    hessian: HessianAccumulator | None = None
    amax: float = 0.0
    inputs: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.amax = max(self.amax, float(x.abs().max()))
        if self.hessian is not None:
            self.hessian.add(x)
        if self.keep_inputs:
            self.inputs.append(x)

    def stacked(self) -> torch.Tensor:
        """All kept inputs ``[T, K]``."""
        return torch.cat(self.inputs)


class _Stop(Exception):
    pass


@reading_checkpoint()
def load_model(src: Path) -> torch.nn.Module:
    """transformers' model of the checkpoint, in its own dtype, on the CPU, in eval mode.

    The weights are read by ``engine.tensor_files`` (as the rest of the tool reads them), so
    every source it accepts works: state dicts under any name, no index needed."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    config = AutoConfig.from_pretrained(src)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{src}: transformers has no causal LM for {config.model_type!r}")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model = model_class.from_pretrained(
        None, config=config, state_dict=_source_tensors(src), dtype="auto"
    )
    return model.eval()


def _source_tensors(src: Path) -> dict[str, torch.Tensor]:
    names_by_file: dict[Path, list[str]] = {}
    for name, file in checkpoint_tensor_files(src).items():
        names_by_file.setdefault(file, []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file, names in names_by_file.items():
        with open_tensor_file(file) as fh:
            tensors.update((name, fh.get(name)) for name in names)
    return tensors


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.model.layers


@torch.no_grad()
def first_layer_inputs(
    model: torch.nn.Module, tokens: torch.Tensor, device: torch.device, batch_size: int = 8
) -> list[LayerBatch]:
    """Hidden states and layer keyword arguments entering layer 0, per batch of samples."""
    inner = model.model
    inner.embed_tokens.to(device).float()
    inner.rotary_emb.to(device).float()
    batches: list[LayerBatch] = []

    def catch(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")}
        batches.append(LayerBatch(hidden.float(), _float_kwargs(kwargs)))
        raise _Stop

    handle = inner.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for chunk in tokens.split(batch_size):
            with contextlib.suppress(_Stop):
                model(input_ids=chunk.to(device), use_cache=False)
    finally:
        handle.remove()
        inner.embed_tokens.to("cpu")
    return batches


def _float_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    def cast(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.float()
        if isinstance(v, tuple):
            return tuple(cast(x) for x in v)
        return v

    return {k: cast(v) for k, v in kwargs.items()}


def linear_modules(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The layer's linear layers by module name (``self_attn.q_proj``, ...)."""
    return {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


@torch.no_grad()
def capture_linear_inputs(
    layer: torch.nn.Module,
    batches: list[LayerBatch],
    keep_inputs: bool = False,
    hessian: bool = False,
    only: set[str] | None = None,
) -> dict[str, LinearStats]:
    """Run ``layer`` on ``batches`` and gather its linear layers' (or those named in
    ``only``) input statistics."""
    stats: dict[str, LinearStats] = {}
    seen: list[tuple[torch.Tensor, LinearStats]] = []  # inputs of this batch, to share stats

    def hook_for(name: str):
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            if name not in stats:
                shared = next((s for t, s in seen if t is x), None)
                stats[name] = shared or LinearStats(
                    keep_inputs=keep_inputs, hessian=HessianAccumulator() if hessian else None
                )
            entry = stats[name]
            if not any(s is entry for t, s in seen if t is x):
                entry.add(x)
            seen.append((x, entry))

        return hook

    handles = [
        m.register_forward_pre_hook(hook_for(n))
        for n, m in linear_modules(layer).items()
        if only is None or n in only
    ]
    try:
        for batch in batches:
            seen.clear()
            _forward(layer, batch)
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    return stats


@torch.no_grad()
def run_layer(layer: torch.nn.Module, batches: list[LayerBatch]) -> list[LayerBatch]:
    """The layer's outputs, as the next layer's inputs."""
    return [LayerBatch(_forward(layer, b), b.kwargs) for b in batches]


def _forward(layer: torch.nn.Module, batch: LayerBatch) -> torch.Tensor:
    out = layer(batch.hidden, **batch.kwargs)
    return out[0] if isinstance(out, tuple) else out
