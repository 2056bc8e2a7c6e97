"""Resampler: fewer, wider visual tokens before the connector (Uni-Med, compression rate alpha)."""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor, nn
from torch.nn import functional as F

ResampleMethod = Literal["projection", "avg", "max"]


class Resampler(nn.Module):
    """Compress ``P`` patch tokens by ``rate`` (no parameters).

    ``projection`` (the reference default) concatenates ``rate`` consecutive tokens channel-wise:
    ``(B, P, C) -> (B, P / rate, rate * C)``, i.e. output token ``j`` is
    ``cat(x[:, rate*j], ..., x[:, rate*j + rate - 1])`` in the raster order of the input.
    ``avg`` and ``max`` pool ``sqrt(rate) x sqrt(rate)`` windows of the patch grid instead:
    ``(B, P, C) -> (B, P / rate, C)`` (``rate`` must then be a perfect square).

    Args:
        rate: compression rate alpha (1 keeps the tokens).
        method: ``"projection"``, ``"avg"`` or ``"max"``.
    """

    def __init__(self, rate: int = 4, method: ResampleMethod = "projection") -> None:
        super().__init__()
        if rate < 1:
            raise ValueError(f"Resampler: rate must be >= 1, got {rate}")
        if method not in ("projection", "avg", "max"):
            raise ValueError(f"Resampler: method must be 'projection', 'avg' or 'max', got {method!r}")
        if method != "projection" and math.isqrt(rate) ** 2 != rate:
            raise ValueError(f"Resampler: {method} pooling needs a square rate (1, 4, 9...), got {rate}")
        self.rate = rate
        self.method = method

    def out_dim(self, in_dim: int) -> int:
        """Channels of an output token for input tokens of ``in_dim`` channels."""
        return in_dim * self.rate if self.method == "projection" else in_dim

    def forward(self, tokens: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """Resample ``tokens`` (B, P, C) given in raster order of a ``grid`` (rows, cols).

        ``grid`` is only needed by the pooling methods; ``None`` means a square grid.
        """
        if tokens.ndim != 3:
            raise ValueError(f"Resampler expects (B, P, C) tokens, got shape {tuple(tokens.shape)}")
        b, p, c = tokens.shape
        if self.method == "projection":
            if p % self.rate:
                raise ValueError(
                    f"Resampler: {p} tokens are not divisible by rate {self.rate}; choose an image size "
                    f"whose token grid has a multiple of {self.rate} cells (e.g. 8 x 8 at stride 32 = 256 px)"
                )
            return tokens.reshape(b, p // self.rate, self.rate * c)
        rows, cols = grid if grid is not None else (math.isqrt(p), math.isqrt(p))
        side = math.isqrt(self.rate)
        if rows * cols != p or rows % side or cols % side:
            raise ValueError(
                f"Resampler: {p} tokens on a {rows} x {cols} grid cannot be pooled in {side} x {side} windows"
            )
        maps = tokens.transpose(1, 2).reshape(b, c, rows, cols)
        pool = F.avg_pool2d if self.method == "avg" else F.max_pool2d
        return pool(maps, side).flatten(2).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"rate={self.rate}, method={self.method!r}"
