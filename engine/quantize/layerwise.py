"""The calibrated pass: the transformers model runs one decoder layer at a time
(``capture``); AWQ folds its scales into the layer, then every linear layer is quantized;
GPTQ goes through the layer's linear layers in execution order (q/k/v, o, gate/up, down),
re-running the layer after each group so that later groups see the quantized earlier
ones (AutoGPTQ's ``true_sequential``), and feeds the quantized layer's outputs to the next
layer. ``quantize_weight`` turns one weight into its format's tensors (both passes use it).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import torch

from engine.quantize import capture
from engine.quantize.awq_search import fold_decoder_layer
from engine.quantize.formats import (
    QuantSpec,
    float8_tensors,
    input_scale,
    int8_tensors,
    int_tensors,
    min_zero,
)
from engine.quantize.gptq import gptq_quantize
from engine.quantize.rtn import quantize_rtn
from engine.quantize.writers import ShardWriter

log = logging.getLogger(__name__)

LINEAR_WEIGHT = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
GPTQ_ORDER = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def quantize_weight(
    spec: QuantSpec, w: torch.Tensor, stats: capture.LinearStats | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """One linear weight ``[N, K]`` -> its tensors in the format, and (integer formats) the
    dequantized weight for the next layers' calibration."""
    if spec.method in ("awq", "gptq"):
        g = spec.group_for(w.shape[1])
        if spec.algorithm == "gptq":
            assert stats is not None and stats.hessian is not None
            gq = gptq_quantize(
                w,
                stats.hessian.hessian(),
                spec.bits,
                g,
                spec.sym,
                spec.act_order,
                spec.static_groups,
                spec.damp_percent,
                min_zero=min_zero(spec),
            )
        else:
            gq = quantize_rtn(w.float().cpu(), spec.bits, g, spec.sym, min_zero(spec))
        return int_tensors(spec, gq), gq.dequantize()
    tensors = (float8_tensors if spec.method == "fp8" else int8_tensors)(w.cpu(), spec.strategy)
    if spec.activations == "static":
        assert stats is not None
        tensors["input_scale"] = input_scale(spec, stats.amax)
    return tensors, None


@torch.no_grad()
def calibrated_pass(
    src: Path,
    spec: QuantSpec,
    tokens: torch.Tensor,
    dev: torch.device,
    writer: ShardWriter,
    out_dtype: torch.dtype,
    source_names: set[str],
) -> set[str]:
    model = capture.load_model(src)
    batches = capture.first_layer_inputs(model, tokens, dev)
    layers = capture.decoder_layers(model)
    done: set[str] = set()
    for i in range(len(layers)):
        started = time.monotonic()
        layer = layers[i].to(dev).float()
        linears = {
            n: m
            for n, m in capture.linear_modules(layer).items()
            if LINEAR_WEIGHT.match(f"model.layers.{i}.{n}.weight")
        }
        note = ""
        if spec.algorithm == "gptq":
            quantized = _gptq_layer(spec, layer, linears, batches)
        else:
            stats = capture.capture_linear_inputs(
                layer, batches, keep_inputs=spec.algorithm == "awq"
            )
            if spec.algorithm == "awq":
                alphas = fold_decoder_layer(
                    layer, {n: s.stacked() for n, s in stats.items()}, spec.bits, spec.group_size
                )
                note = ", awq alpha " + " ".join(f"{k}={v:.2f}" for k, v in alphas.items())
            quantized = {
                n: quantize_weight(spec, m.weight, stats.get(n))[0] for n, m in linears.items()
            }
        for name, tensors in quantized.items():
            for key, t in tensors.items():
                writer.add(f"model.layers.{i}.{name}.{key}", t)
        for pname, p in layer.state_dict().items():  # norms (AWQ-folded), biases
            full = f"model.layers.{i}.{pname}"
            if full in source_names and not LINEAR_WEIGHT.match(full):
                writer.add(full, p.to(out_dtype) if p.is_floating_point() else p)
                done.add(full)
        done.update(f"model.layers.{i}.{n}.weight" for n in linears)
        if i + 1 < len(layers):
            batches = capture.run_layer(layer, batches)
        layers[i] = torch.nn.Identity()  # free the upcast layer
        log.info(
            "layer %d/%d: %d linear layers quantized in %.1fs%s",
            i + 1,
            len(layers),
            len(quantized),
            time.monotonic() - started,
            note,
        )
    return done


def _gptq_layer(
    spec: QuantSpec,
    layer: torch.nn.Module,
    linears: dict[str, torch.nn.Linear],
    batches: list[capture.LayerBatch],
) -> dict[str, dict[str, torch.Tensor]]:
    """GPTQ over the layer's linear layers in execution order, each group's Hessian taken
    with the earlier groups already quantized (AutoGPTQ's ``true_sequential``)."""
    order = [[n for n in linears if n.rsplit(".", 1)[-1] in group] for group in GPTQ_ORDER]
    rest = [n for n in linears if not any(n in g for g in order)]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for group in [g for g in order if g] + ([rest] if rest else []):
        stats = capture.capture_linear_inputs(layer, batches, hessian=True, only=set(group))
        for name in group:
            tensors, deq = quantize_weight(spec, linears[name].weight, stats[name])
            out[name] = tensors
            linears[name].weight.copy_(deq.to(linears[name].weight.device))
    return out
