"""``python -m engine.quantize --model SRC --output DST --method awq|gptq|fp8|int8|gguf ...``"""

from __future__ import annotations

import argparse
import logging
import sys

from engine.quantize import METHODS, quantize_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.quantize",
        description="Quantize a fp16/bf16/fp32 Llama-family checkpoint into AWQ (AutoAWQ GEMM), "
        "GPTQ (AutoGPTQ v1), compressed-tensors FP8 / INT8 W8A8, or one GGUF file for llama.cpp.",
    )
    p.add_argument("--model", required=True, help="source checkpoint folder")
    p.add_argument("--output", required=True, help="new (or empty) output folder; gguf: a new .gguf file")
    p.add_argument("--method", required=True, choices=(*METHODS, "gguf"))
    p.add_argument(
        "--gguf_type",
        default="Q8_0",
        help="gguf: Q8_0 (default), Q4_0 (token embedding and head in Q8_0), F16 or F32",
    )
    p.add_argument(
        "--bits", type=int, default=None, help="awq: 4; gptq: 2, 3, 4 (default) or 8; fp8/int8: 8"
    )
    p.add_argument(
        "--group_size",
        type=int,
        default=128,
        help="awq/gptq group size along K; -1: one group per row",
    )
    p.add_argument(
        "--algorithm",
        default="auto",
        choices=("auto", "awq", "gptq", "rtn"),
        help="awq: awq|rtn, gptq: gptq|rtn",
    )
    p.add_argument(
        "--act_order",
        action="store_true",
        help="gptq: columns by decreasing Hessian diagonal (desc_act)",
    )
    p.add_argument("--sym", action="store_true", help="gptq: symmetric (zero point 2^(bits-1))")
    p.add_argument(
        "--static_groups", action="store_true", help="gptq: group parameters fixed before the pass"
    )
    p.add_argument(
        "--damp_percent",
        type=float,
        default=0.01,
        help="gptq: damping, a fraction of the mean Hessian diagonal",
    )
    p.add_argument(
        "--strategy", default="channel", help="fp8/int8 weight scales: tensor or channel"
    )
    p.add_argument(
        "--activations",
        default="dynamic",
        help="fp8/int8: dynamic (per token) or static (calibrated input_scale)",
    )
    p.add_argument(
        "--calibration",
        default=None,
        help="calibration text file (.txt, or .jsonl with a 'text' field)",
    )
    p.add_argument("--num_samples", type=int, default=32, help="calibration windows")
    p.add_argument("--seq_len", type=int, default=128, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device", default=None, help="where calibration runs (default: cuda if present, else cpu)"
    )
    p.add_argument("--log_level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.method == "gguf":
            from engine.gguf.writer import write_gguf

            write_gguf(args.model, args.output, args.gguf_type)
            return 0
        quantize_checkpoint(
            args.model,
            args.output,
            args.method,
            bits=args.bits,
            group_size=args.group_size,
            algorithm=args.algorithm,
            act_order=args.act_order,
            sym=args.sym,
            calibration=args.calibration,
            num_samples=args.num_samples,
            seq_len=args.seq_len,
            strategy=args.strategy,
            activations=args.activations,
            damp_percent=args.damp_percent,
            seed=args.seed,
            static_groups=args.static_groups,
            device=args.device,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
