"""What each output format stores per linear layer and in its config (see FORMATS.md).

``QuantSpec`` holds the tool's settings, checked against the model's layer shapes before
any work (``check_shapes``). ``int_tensors`` turns a ``GroupQuant`` into AWQ or GPTQ
tensors, ``float8_tensors`` / ``int8_tensors`` quantize a weight the compressed-tensors
way, and ``quantization_config`` writes the matching config.json entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.quantization.packing import GPTQ_BITS, pack_awq, pack_gptq_cols, pack_gptq_rows
from engine.quantize.rtn import GroupQuant

METHODS = ("awq", "gptq", "fp8", "int8")
ALGORITHMS = {"awq": ("awq", "rtn"), "gptq": ("gptq", "rtn")}
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
# compressed-tensors' symmetric scale: amax / ((q_max - q_min) / 2)
FP8_SCALE_DIVISOR = FP8_MAX
INT8_SCALE_DIVISOR = 127.5


@dataclass(frozen=True)
class QuantSpec:
    method: str
    bits: int
    group_size: int
    algorithm: str  # awq | gptq | rtn | "" (fp8, int8)
    act_order: bool = False
    sym: bool = False
    static_groups: bool = False
    strategy: str = "channel"
    activations: str = "dynamic"
    damp_percent: float = 0.01

    @property
    def needs_calibration(self) -> bool:
        return self.algorithm in ("awq", "gptq") or self.activations == "static"

    def group_for(self, k: int) -> int:
        return k if self.group_size == -1 else self.group_size


def make_spec(
    method: str,
    bits: int | None,
    group_size: int,
    algorithm: str,
    act_order: bool,
    sym: bool,
    static_groups: bool,
    strategy: str,
    activations: str,
    damp_percent: float,
) -> QuantSpec:
    """Check the settings that do not depend on the model; clear errors name the flag."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if method in ("fp8", "int8"):
        if bits not in (None, 8):
            raise ValueError(
                f"--method {method} stores 8-bit weights; --bits {bits} is not possible"
            )
        if algorithm not in ("auto", "rtn"):
            raise ValueError(f"--algorithm {algorithm!r} applies to awq and gptq only")
        if act_order or sym or static_groups:
            raise ValueError("--act_order, --sym and --static_groups apply to --method gptq only")
        if strategy not in ("tensor", "channel"):
            raise ValueError(f"--strategy {strategy!r}: choose tensor or channel")
        if activations not in ("dynamic", "static"):
            raise ValueError(f"--activations {activations!r}: choose dynamic or static")
        return QuantSpec(method, 8, -1, "", strategy=strategy, activations=activations)
    if activations != "dynamic" or strategy != "channel":
        raise ValueError(f"--strategy and --activations apply to fp8 and int8, not {method}")
    bits = 4 if bits is None else bits
    if method == "awq" and bits != 4:
        raise ValueError(
            f"--method awq writes 4-bit weights only (AutoAWQ GEMM); got --bits {bits}"
        )
    if method == "gptq" and bits not in GPTQ_BITS:
        raise ValueError(
            f"--method gptq supports --bits {', '.join(map(str, GPTQ_BITS))}; got {bits}"
        )
    if group_size != -1 and group_size <= 0:
        raise ValueError(
            f"--group_size must be positive or -1 (one group per row), got {group_size}"
        )
    if algorithm == "auto":
        algorithm = method
    if algorithm not in ALGORITHMS[method]:
        raise ValueError(
            f"--algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS[method])} for {method}"
        )
    if method == "awq" and (act_order or sym or static_groups):
        raise ValueError(
            "--act_order, --sym and --static_groups apply to --method gptq only (AWQ uses zero points)"
        )
    if (act_order or static_groups) and algorithm != "gptq":
        raise ValueError(
            "--act_order and --static_groups need --algorithm gptq (they order the GPTQ pass)"
        )
    if not 0.0 < damp_percent < 1.0:
        raise ValueError(f"--damp_percent must lie in (0, 1), got {damp_percent}")
    return QuantSpec(
        method,
        bits,
        group_size,
        algorithm,
        act_order,
        sym,
        static_groups,
        damp_percent=damp_percent,
    )


def check_shapes(spec: QuantSpec, shapes: dict[str, tuple[int, int]]) -> None:
    """Every linear weight ``[N, K]`` must fit the format's packing."""
    for name, (n, k) in shapes.items():
        if spec.method == "awq":
            g = spec.group_for(k)
            if k % g:
                raise ValueError(
                    f"--group_size {spec.group_size} does not divide in_features {k} of {name} (AWQ needs K % G == 0)"
                )
            if n % 8:
                raise ValueError(
                    f"{name}: out_features {n} is not a multiple of 8, which AWQ packing needs"
                )
        elif spec.method == "gptq":
            per = 32 if spec.bits == 3 else 32 // spec.bits
            for dim, size in (("in_features", k), ("out_features", n)):
                if size % per:
                    raise ValueError(
                        f"{name}: {dim} {size} is not a multiple of {per}, which {spec.bits}-bit GPTQ packing needs"
                    )
            if spec.act_order and spec.group_size != -1 and k % spec.group_size:
                raise ValueError(
                    f"--act_order needs --group_size dividing in_features {k} of {name}"
                )


def min_zero(spec: QuantSpec) -> int:
    """GPTQ v1 stores z - 1: keep asymmetric zero points >= 1 (see ``rtn``)."""
    return 1 if spec.method == "gptq" and not spec.sym else 0


def int_tensors(spec: QuantSpec, gq: GroupQuant) -> dict[str, torch.Tensor]:
    """AWQ GEMM or GPTQ v1 tensors of one layer (names relative to the layer)."""
    q_kn = gq.q.T.contiguous()  # [K, N]
    scales = gq.scales.to(torch.float16)
    if spec.method == "awq":
        return {"qweight": pack_awq(q_kn), "qzeros": pack_awq(gq.zeros), "scales": scales}
    return {
        "qweight": pack_gptq_rows(q_kn, spec.bits),
        "qzeros": pack_gptq_cols(gq.zeros - 1, spec.bits),
        "scales": scales,
        "g_idx": gq.g_idx.to(torch.int32),
    }


def _absmax_scale(w: torch.Tensor, strategy: str, divisor: float) -> torch.Tensor:
    amax = w.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w.abs().amax().reshape(1)
    scale = amax / divisor
    return torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)


def float8_tensors(w: torch.Tensor, strategy: str) -> dict[str, torch.Tensor]:
    """``weight`` e4m3 ``[N, K]`` and ``weight_scale`` (1,) or (N, 1) float32."""
    w = w.float()
    scale = _absmax_scale(w, strategy, FP8_SCALE_DIVISOR)
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale}


def int8_tensors(w: torch.Tensor, strategy: str) -> dict[str, torch.Tensor]:
    """``weight`` int8 ``[N, K]`` and ``weight_scale`` (N, 1) or (1,) float32
    (compressed-tensors: scale = amax / 127.5, round(clamp(w / scale, -128, 127)))."""
    w = w.float()
    scale = _absmax_scale(w, strategy, INT8_SCALE_DIVISOR)
    q = torch.round((w / scale).clamp(-128, 127)).to(torch.int8)
    return {"weight": q, "weight_scale": scale}


def input_scale(spec: QuantSpec, amax: float) -> torch.Tensor:
    """Static per-tensor activation scale ``(1,)`` from the calibration max |x|."""
    divisor = FP8_SCALE_DIVISOR if spec.method == "fp8" else INT8_SCALE_DIVISOR
    return torch.tensor([max(amax, 1e-12) / divisor], dtype=torch.float32)


def quantization_config(spec: QuantSpec) -> dict:
    """The ``quantization_config`` entry of config.json."""
    if spec.method == "awq":
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": spec.group_size,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": None,
        }
    if spec.method == "gptq":
        return {
            "bits": spec.bits,
            "group_size": spec.group_size,
            "damp_percent": spec.damp_percent,
            "desc_act": spec.act_order,
            "static_groups": spec.static_groups,
            "sym": spec.sym,
            "true_sequential": True,
            "model_name_or_path": None,
            "model_file_base_name": "model",
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
        }
    kind = "float" if spec.method == "fp8" else "int"
    scheme = {"num_bits": 8, "type": kind, "symmetric": True, "group_size": None}
    weights = {**scheme, "strategy": spec.strategy, "dynamic": False}
    dynamic = spec.activations == "dynamic"
    acts = {**scheme, "strategy": "token" if dynamic else "tensor", "dynamic": dynamic}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": acts}
    return {
        "quant_method": "compressed-tensors",
        "format": f"{kind}-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {**group, "output_activations": None, "format": None}},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
