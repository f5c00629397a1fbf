"""RMSNorm, computed in float32 whatever the model dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.empty(size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and x.device.type == "cpu":
            # the same sums in one call, bit-identical on the CPU: fewer dispatches per step
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        if x.device.type == "cpu":  # the float32 sums as below in one call, bit-identical
            x32 = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        else:
            x32 = x.float()
            x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast back before the weight, as the reference implementations do (bf16 parity).
        return self.weight * x32.to(dtype)
