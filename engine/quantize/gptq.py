"""GPTQ: quantize a linear weight column by column, feeding each column's rounding error
back into the columns not yet quantized, weighted by the inverse Hessian of the layer's
output error (Frantar et al., 2022).

For ``y = x W^T`` the squared output error over calibration inputs ``X [T, K]`` is a
quadratic form in the weight error with Hessian ``H = 2 X^T X / T``. Each column ``j`` is
rounded, and its error divided by ``[H^-1]_jj`` is spread over the later columns along
row ``j`` of the upper Cholesky factor of ``H^-1``; errors are applied lazily, in blocks
of ``block_size`` columns. Group scales and zeros are chosen when the quantizer reaches a
group's first column, from the error-updated weights (or up front, ``static_groups``).
With ``act_order`` columns go by decreasing ``diag(H)`` and ``g_idx`` records the group
of each original column.
"""

from __future__ import annotations

import logging

import torch

from engine.quantize.rtn import GroupQuant, group_params, quantize_with

log = logging.getLogger(__name__)


class HessianAccumulator:
    """``H = 2 X^T X / T`` over batches of one layer's inputs (float32, on their device)."""

    def __init__(self) -> None:
        self.h: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        xtx = x.T @ x
        self.h = xtx if self.h is None else self.h + xtx
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.h is None:
            raise ValueError("no calibration tokens reached this layer")
        return (2.0 / self.tokens) * self.h


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool = False,
    act_order: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    min_zero: int = 0,
) -> GroupQuant:
    """Quantize ``weight [N, K]`` given ``hessian [K, K]``; ``group_size`` -1 is one group
    per row. Returns integers and group parameters in the original column order."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().to(w.device).clone()
    n, k = w.shape
    dev = w.device
    g = k if group_size == -1 else group_size
    num_groups = -(-k // g)

    dead = torch.diag(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    static: list[tuple[torch.Tensor, torch.Tensor]] = []
    if static_groups:  # groups over the original column order, fixed before any update
        static = [
            group_params(w[:, i * g : (i + 1) * g], bits, sym, min_zero) for i in range(num_groups)
        ]

    perm = (
        torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=dev)
    )
    w, h = w[:, perm], h[perm][:, perm]

    h += damp_percent * torch.mean(torch.diag(h)) * torch.eye(k, device=dev)
    hinv = _inverse_cholesky_upper(h)
    order = perm.tolist()

    q = torch.zeros(n, k, device=dev)
    scales = torch.zeros(num_groups, n, device=dev)
    zeros = torch.zeros(num_groups, n, device=dev)
    group_of = torch.zeros(k, dtype=torch.long, device=dev)  # by permuted position
    scale = zero = None
    for b1 in range(0, k, block_size):
        b2 = min(b1 + block_size, k)
        w1, hinv1 = w[:, b1:b2].clone(), hinv[b1:b2, b1:b2]
        err1 = torch.zeros_like(w1)
        for i in range(b2 - b1):
            col = b1 + i
            if static_groups:
                grp = order[col] // g
                scale, zero = static[grp]
                scales[grp], zeros[grp] = scale, zero
            else:
                grp = col // g
                if col % g == 0:
                    ahead = torch.cat([w1[:, i:], w[:, b2:]], dim=1)[:, :g]  # error-updated
                    scale, zero = group_params(ahead, bits, sym, min_zero)
                    scales[grp], zeros[grp] = scale, zero
            group_of[col] = grp
            x = w1[:, i]
            qi = quantize_with(x, scale, zero, bits)
            q[:, col] = qi
            err = (x - (qi - zero) * scale) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, b2:] -= err1 @ hinv[b1:b2, b2:]

    inv = torch.argsort(perm)
    return GroupQuant(
        q=q[:, inv].to(torch.int32).cpu(),
        scales=scales.cpu(),
        zeros=zeros.to(torch.int32).cpu(),
        g_idx=group_of[inv].to(torch.int32).cpu(),
        bits=bits,
        group_size=g,
    )


def _inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``h^-1``; more damping if ``h`` is not positive definite."""
    damp = 0.0
    base = torch.mean(torch.diag(h))
    for _ in range(6):
        try:
            chol = torch.linalg.cholesky(h + damp * base * torch.eye(h.shape[0], device=h.device))
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
        except torch.linalg.LinAlgError:
            damp = 0.01 if damp == 0 else damp * 10
            log.warning("Hessian not positive definite; adding %.0e of its mean diagonal", damp)
    raise ValueError("the layer's Hessian stays singular after damping; use more calibration data")
