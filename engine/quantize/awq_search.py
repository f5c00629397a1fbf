"""AWQ: activation-aware per-input-channel scales, folded into the preceding op (Lin et al.,
2023).

For a group of linear layers that read the same input ``x [T, K]``, the weights' input
channels are multiplied by ``s [K]`` before quantization and the input is divided by
``s``: ``x W^T = (x / s) (W diag(s))^T``, exact before rounding, but channels with large
activations get finer steps. ``s = mean|x|^alpha`` (normalised so that
``max(s) * min(s) = 1``) with ``alpha`` on a grid over ``[0, 1]``; the one with the least
output error on the calibration activations wins. ``alpha = 0`` is ``s = 1``, plain
round-to-nearest, so the search never does worse than RTN on those activations.

Where ``1 / s`` goes in a Llama-family decoder layer (``fold_decoder_layer``):

- ``input_layernorm.weight /= s``; q/k/v columns ``*= s``.
- ``v_proj`` rows (and bias) ``/= s``; ``o_proj`` columns ``*= s``: only when v_proj's
  outputs are o_proj's inputs one to one (no grouped-query attention), as in AutoAWQ.
- ``post_attention_layernorm.weight /= s``; gate/up columns ``*= s``.
- ``up_proj`` rows (and bias) ``/= s``; ``down_proj`` columns ``*= s`` (the MLP input to
  down is ``act(gate) * up``, linear in up's output).

Every fold is exact in real arithmetic (the RMSNorm weight multiplies its output), so
the folded model computes the same function. AutoAWQ's weight-clipping search is not done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.quantize.rtn import fake_quantize

log = logging.getLogger(__name__)

N_GRID = 20  # alpha = 0, 1/20, ..., 1


@dataclass
class ScaleSearch:
    scales: torch.Tensor  # [K]
    alpha: float
    error: float  # mean squared output error with the chosen scales
    rtn_error: float  # the same with s = 1


def output_error(x: torch.Tensor, weights: list[torch.Tensor], deq: list[torch.Tensor]) -> float:
    """Mean squared error of ``x W^T`` over the group's layers."""
    total, count = 0.0, 0
    for w, wq in zip(weights, deq, strict=True):
        diff = x @ (w - wq).T
        total += float(diff.pow(2).sum())
        count += diff.numel()
    return total / count


@torch.no_grad()
def search_scale(
    x: torch.Tensor, weights: list[torch.Tensor], bits: int, group_size: int, n_grid: int = N_GRID
) -> ScaleSearch:
    """Best ``s [K]`` for the layers ``weights [N_i, K]`` that read ``x [T, K]``."""
    x = x.reshape(-1, x.shape[-1]).float()
    weights = [w.float() for w in weights]
    mean_abs = x.abs().mean(dim=0)
    best: ScaleSearch | None = None
    rtn_error = 0.0
    for step in range(n_grid + 1):
        alpha = step / n_grid
        s = mean_abs.pow(alpha).clamp(min=1e-4)
        s = s / torch.sqrt(s.max() * s.min())
        deq = [fake_quantize(w * s, bits, group_size) / s for w in weights]
        err = output_error(x, weights, deq)
        if step == 0:
            rtn_error = err
        if best is None or err < best.error:
            best = ScaleSearch(s, alpha, err, rtn_error)
    assert best is not None
    best.rtn_error = rtn_error
    return best


@torch.no_grad()
def fold_decoder_layer(
    layer: torch.nn.Module, inputs: dict[str, torch.Tensor], bits: int, group_size: int
) -> dict[str, float]:
    """Search and fold the scales of one transformers Llama-family decoder layer in place;
    ``inputs`` are its linear layers' calibration inputs by module name
    (``self_attn.q_proj``, ``self_attn.o_proj``, ``mlp.gate_proj``, ``mlp.down_proj``).
    Returns the chosen alpha per scaled group."""
    attn, mlp = layer.self_attn, layer.mlp
    groups: list[tuple[str, torch.nn.Module, list[torch.nn.Linear], str]] = [
        ("qkv", layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], "self_attn.q_proj"),
        ("gate_up", layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], "mlp.gate_proj"),
        ("down", mlp.up_proj, [mlp.down_proj], "mlp.down_proj"),
    ]
    if attn.v_proj.out_features == attn.o_proj.in_features:
        groups.insert(1, ("o", attn.v_proj, [attn.o_proj], "self_attn.o_proj"))
    chosen: dict[str, float] = {}
    for name, prev, linears, input_name in groups:
        found = search_scale(inputs[input_name], [m.weight for m in linears], bits, group_size)
        fold_scale(prev, linears, found.scales)
        chosen[name] = found.alpha
        log.debug(
            "awq %s: alpha %.2f, error %.3g (rtn %.3g)",
            name,
            found.alpha,
            found.error,
            found.rtn_error,
        )
    return chosen


def fold_scale(prev: torch.nn.Module, linears: list[torch.nn.Linear], s: torch.Tensor) -> None:
    """``prev``'s outputs ``/= s`` (an RMSNorm's weight, or a linear layer's rows and bias);
    the input columns of ``linears`` ``*= s``."""
    s = s.to(prev.weight.device)
    if isinstance(prev, torch.nn.Linear):
        prev.weight.div_(s.to(prev.weight.dtype)[:, None])
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:  # RMSNorm: y = weight * x / rms(x)
        prev.weight.div_(s.to(prev.weight.dtype))
    for linear in linears:
        linear.weight.mul_(s.to(linear.weight.dtype)[None, :])
