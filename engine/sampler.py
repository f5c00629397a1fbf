"""Pick the next token of every sequence in a batch from its logits.

Greedy for ``temperature == 0``; otherwise temperature, then top-k, then top-p
(nucleus), then a draw. The draw uses the exponential-race trick
(``argmax(p / q)`` with ``q ~ Exp(1)``), which equals sampling from ``p``, and
lets each seeded request draw its noise from its own ``torch.Generator``: a
seeded request gets the same tokens whatever its batch mates are.

The common cases are vectorised over the batch: one argmax for greedy rows,
one softmax and one noise tensor for sampled rows, and the sort for top-k /
top-p only when some row asks for them.
"""

from __future__ import annotations

import torch

from engine.api import SamplingParams


class Sampler:
    """Batched sampler; ``generator`` draws the noise of unseeded requests."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    @torch.inference_mode()
    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None] | None = None,
    ) -> torch.Tensor:
        """``logits [n, vocab]`` (float32) -> token ids ``[n]`` (int64, on the logits' device)."""
        n = logits.shape[0]
        assert logits.dim() == 2 and len(params) == n
        generators = generators if generators is not None else [None] * n
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        if len(greedy_rows) == n:
            return logits.argmax(dim=-1)
        tokens = torch.empty(n, dtype=torch.long, device=logits.device)
        if greedy_rows:
            rows = torch.tensor(greedy_rows, device=logits.device)
            tokens[rows] = logits[rows].argmax(dim=-1)
        sample_rows = [i for i, p in enumerate(params) if not p.greedy]
        rows = torch.tensor(sample_rows, device=logits.device)
        sampled = self._sample(
            logits[rows].float(),
            [params[i] for i in sample_rows],
            [generators[i] for i in sample_rows],
        )
        tokens[rows] = sampled
        return tokens

    def _sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> torch.Tensor:
        # logits [m, V], every row with temperature > 0
        device = logits.device
        temps = torch.tensor([p.temperature for p in params], device=device, dtype=logits.dtype)
        logits = logits / temps[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            logits = _apply_top_k_top_p(logits, params)
        probs = torch.softmax(logits, dim=-1)
        # Noise in vocabulary order, so a row's draw never depends on its batch mates.
        noise = self._exponential_noise(probs.shape, generators, device)
        return (probs / noise).argmax(dim=-1)  # [m]

    def _exponential_noise(
        self, shape: torch.Size, generators: list[torch.Generator | None], device: torch.device
    ) -> torch.Tensor:
        noise = torch.empty(shape, device=device)
        if all(g is None for g in generators):
            noise.exponential_(generator=self.generator)
        else:
            for i, g in enumerate(generators):
                noise[i].exponential_(generator=g if g is not None else self.generator)
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def _apply_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) the tokens that top-k / top-p drop; rows keep vocabulary order."""
    vocab = logits.shape[-1]
    device = logits.device
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    # top_p == 1 keeps everything (a cumulative sum may round past 1.0).
    top_p = torch.tensor(
        [p.top_p if p.top_p < 1.0 else float("inf") for p in params],
        device=device,
        dtype=logits.dtype,
    )
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
    drop = mass_before >= top_p[:, None]
    drop[:, 0] = False  # the most likely token always stays
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)
