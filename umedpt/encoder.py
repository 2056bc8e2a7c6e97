"""The shared encoder: a timm Swin Transformer with LayerNorm-type norms only."""

from __future__ import annotations

from typing import Any, Literal

import timm
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm


def find_batchnorm(module: nn.Module) -> list[str]:
    """Names of all BatchNorm modules inside ``module`` (empty when there is none)."""
    return [name for name, m in module.named_modules() if isinstance(m, _BatchNorm)]


#: why the shared encoder refuses BatchNorm (said by every refusal)
BATCHNORM_REFUSED = (
    "the shared encoder sees one task's batch per step, from a different dataset each time, so "
    "BatchNorm's running statistics describe a mixture of the tasks rather than any one of them "
    "(benchmarks/norm_ablation.py: 0.07-0.09 AUROC below each task's own statistics; see "
    "docs/normalization.md); use LayerNorm-type norms (LayerNorm, GroupNorm)"
)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channels of channels-last tokens ``(..., C)`` (Swin's ``(B, H, W, C)``),
    statistics over every token of the batch. Only for the normalisation ablation
    (``SwinEncoder(norm="batchnorm", allow_batchnorm=True)``)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class SwinEncoder(nn.Module):
    """Swin Transformer feature pyramid for any input size and 1- or 3-channel images.

    ``forward(x)`` returns four NCHW maps at strides 4, 8, 16 and 32 (the last one
    passed through the final LayerNorm); ``embed(x)`` returns a pooled ``(B, D)`` vector.

    Args:
        name: timm model name of a Swin variant.
        in_chans: channels the patch embedding expects. With ``in_chans=3`` a
            1-channel input is repeated to 3 channels.
        img_size: nominal image size; other sizes work too (``strict_img_size=False``).
        pretrained: load timm's pretrained weights. Needs them in the local timm/HF cache:
            nothing is downloaded in tests or defaults.
        model_kwargs: extra keyword arguments for ``timm.create_model`` (``embed_dim``,
            ``depths``, ``num_heads``, ``window_size``, ``drop_path_rate`` ...).
        norm: ``layernorm`` (Swin's own, the only choice for pretraining) or ``batchnorm``
            (:class:`TokenBatchNorm` in every norm of the model), which needs ``allow_batchnorm``.
        allow_batchnorm: the escape hatch of the normalisation ablation
            (``benchmarks/norm_ablation.py``): BatchNorm is otherwise refused, here and by
            :class:`~umedpt.MultiTaskModule`, for the reason in :data:`BATCHNORM_REFUSED`.

    Example:
        >>> enc = SwinEncoder(model_kwargs=dict(embed_dim=32, depths=(1, 1, 1, 1),
        ...                   num_heads=(1, 2, 4, 8), window_size=4), img_size=64)
        >>> [tuple(f.shape[1:]) for f in enc(torch.zeros(2, 3, 64, 64))]
        [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
        >>> enc.embed(torch.zeros(2, 1, 64, 64)).shape
        torch.Size([2, 256])
    """

    def __init__(
        self,
        name: str = "swin_tiny_patch4_window7_224",
        in_chans: int = 3,
        img_size: int = 224,
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        norm: Literal["layernorm", "batchnorm"] = "layernorm",
        allow_batchnorm: bool = False,
    ) -> None:
        super().__init__()
        if norm not in ("layernorm", "batchnorm"):
            raise ValueError(f"SwinEncoder: norm must be 'layernorm' or 'batchnorm', got {norm!r}")
        if norm == "batchnorm" and not allow_batchnorm:
            raise ValueError(f"SwinEncoder: norm='batchnorm' is refused: {BATCHNORM_REFUSED} "
                             "(allow_batchnorm=True exists for the ablation only)")  # fmt: skip
        if not name.startswith("swin"):
            raise ValueError(f"SwinEncoder: name must be a timm Swin model ('swin*'), got {name!r}")
        if in_chans not in (1, 3):
            raise ValueError(f"SwinEncoder: in_chans must be 1 or 3, got {in_chans}")
        self.config: dict[str, Any] = {
            "name": name,
            "in_chans": in_chans,
            "img_size": img_size,
            "model_kwargs": dict(model_kwargs or {}),
        }
        if norm != "layernorm":  # kept out of the config of every ordinary encoder (exports unchanged)
            self.config.update(norm=norm, allow_batchnorm=allow_batchnorm)
        self.allow_batchnorm = allow_batchnorm
        extra = {"norm_layer": TokenBatchNorm} if norm == "batchnorm" else {}
        self.model = timm.create_model(
            name,
            pretrained=pretrained,
            num_classes=0,
            in_chans=in_chans,
            img_size=img_size,
            strict_img_size=False,
            **self.config["model_kwargs"],
            **extra,
        )
        bn = find_batchnorm(self.model)
        if bn and not allow_batchnorm:
            raise ValueError(f"SwinEncoder: {name} contains BatchNorm layers {bn[:3]}: {BATCHNORM_REFUSED}")
        info = self.model.feature_info
        self.out_channels: list[int] = [f["num_chs"] for f in info]
        self.reductions: list[int] = [f["reduction"] for f in info]
        self.embed_dim: int = self.model.num_features
        self.in_chans = in_chans
        self.patch_size: tuple[int, int] = tuple(self.model.patch_embed.patch_size)

    def _check_input(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"SwinEncoder expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        channels = x.shape[1]
        if channels == 1 and self.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        elif channels != self.in_chans:
            raise ValueError(
                f"SwinEncoder was built for {self.in_chans}-channel images, got {channels} channels "
                f"(shape {tuple(x.shape)})"
            )
        # sizes that are not a multiple of the patch size are padded at the bottom/right
        pad_h, pad_w = (-x.shape[-2]) % self.patch_size[0], (-x.shape[-1]) % self.patch_size[1]
        return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x

    def token_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(rows, columns)`` of the patch-embedding grid for images of ``(height, width)``
        (sizes padded up to the patch size, as :meth:`forward` does)."""
        return (-(-int(image_size[0]) // self.patch_size[0]), -(-int(image_size[1]) // self.patch_size[1]))

    def forward(self, x: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None) -> list[Tensor]:
        """Feature pyramid: NCHW maps at strides ``self.reductions``.

        Args:
            x: images ``(B, C, H, W)``.
            mask: optional boolean ``(B, rows, cols)`` over the patch-embedding grid
                (:meth:`token_grid`): the embedded patches where it is ``True`` are replaced by
                ``mask_token`` before the first stage (masked image modelling). Without a mask
                the encoder is the plain Swin.
            mask_token: ``(embed_dim,)`` vector (the ``out_channels[0]`` of the first level),
                required with ``mask``; it belongs to the caller (the masked-image head), so the
                encoder's weights and exports are the same with or without masking.
        """
        x = self._check_input(x)
        if mask is None:
            return self.model.forward_intermediates(x, norm=True, output_fmt="NCHW", intermediates_only=True)
        grid = self.token_grid(x.shape[-2:])
        if mask_token is None:
            raise ValueError("SwinEncoder: a mask needs a mask_token (a vector of the first level's channels)")
        if mask.shape != (x.shape[0], *grid):
            raise ValueError(
                f"SwinEncoder: mask of shape {tuple(mask.shape)} for images {tuple(x.shape)}; expected "
                f"{(x.shape[0], *grid)} (batch, patch-grid rows, columns)"
            )
        if mask_token.shape != (self.out_channels[0],):
            raise ValueError(
                f"SwinEncoder: mask_token of shape {tuple(mask_token.shape)}, expected ({self.out_channels[0]},)"
            )

        def substitute(module: nn.Module, inputs: Any, embedded: Tensor) -> Tensor:
            # the patch embedding's output is NHWC: (B, rows, cols, channels)
            keep = (~mask).unsqueeze(-1).to(embedded.dtype)
            return embedded * keep + mask_token.to(embedded.dtype) * (1.0 - keep)

        handle = self.model.patch_embed.register_forward_hook(substitute)
        try:
            return self.model.forward_intermediates(x, norm=True, output_fmt="NCHW", intermediates_only=True)
        finally:
            handle.remove()

    @staticmethod
    def pool(features: list[Tensor]) -> Tensor:
        """Global average of the last pyramid level: ``(B, D)``."""
        return features[-1].mean(dim=(-2, -1))

    def embed(self, x: Tensor) -> Tensor:
        """Image embeddings ``(B, embed_dim)``: average of the last (normalised) level."""
        return self.pool(self(x))

    def extra_repr(self) -> str:
        return f"name={self.config['name']}, in_chans={self.in_chans}, out_channels={self.out_channels}"
