"""EfficientNet exactly as Mammo-CLIP uses it (lukemelas layout, static SAME padding).

Every convolution's zero padding is computed ONCE, at construction, for the architecture's
nominal image size (456 for B5, 260 for B2), propagating n -> ceil(n / s) through strided
convolutions, and then applied unchanged to any input size. This is what the released
Mammo-CLIP weights were trained and evaluated with; TF-style dynamic SAME padding (timm) gives
different features on 1520x912 mammograms. State-dict key names follow lukemelas
EfficientNet-PyTorch (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ..., `_conv_head`, `_bn1`),
without the `_fc` layer that the Mammo-CLIP fork removed.

Facts: shared/reference/mammo-clip-and-mammo-sae.md §2.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MammoSaeError, choices_message

Padding = Literal["static", "dynamic"]
Pads = tuple[int, int, int, int]  # (left, right, top, bottom), as F.pad takes them

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # torch convention; lukemelas stores 1 - 0.99


@dataclass(frozen=True)
class StageArgs:
    """One row of the B0 table (before width/depth scaling)."""

    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int
    repeats: int
    se_ratio: float = 0.25


# EfficientNet-B0 stages (lukemelas `efficientnet()` block strings r1_k3_s11_e1_i32_o16_se0.25 ...).
B0_STAGES: tuple[StageArgs, ...] = (
    StageArgs(3, 1, 1, 32, 16, 1),
    StageArgs(3, 2, 6, 16, 24, 2),
    StageArgs(5, 2, 6, 24, 40, 2),
    StageArgs(3, 2, 6, 40, 80, 3),
    StageArgs(5, 1, 6, 80, 112, 3),
    StageArgs(5, 2, 6, 112, 192, 4),
    StageArgs(3, 1, 6, 192, 320, 1),
)
B0_STEM = 32
B0_HEAD = 1280


@dataclass(frozen=True)
class ArchParams:
    """Global parameters of one family member (lukemelas `efficientnet_params`)."""

    name: str
    width: float
    depth: float
    image_size: int  # nominal size: only used to compute the static pads
    dropout: float
    drop_connect_rate: float = 0.2


@dataclass(frozen=True)
class LayerInfo:
    """A tap point: cumulative stride w.r.t. the input (nominal) and channel count."""

    stride: int
    channels: int


@dataclass(frozen=True)
class BlockSpec:
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int
    se_ratio: float


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """lukemelas `round_filters`: scale channels by width, round to a multiple of 8."""
    if not width:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:  # never round down by more than 10 %
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats)) if depth else repeats


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF SAME padding (before, after) for one axis of length `size`."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Bias-optional conv with SAME padding: static (fixed pads) or dynamic (per input size).

    Static pads that are symmetric are folded into the convolution's own `padding`, which is
    numerically the same zero padding and avoids a copy of the input.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int = 1,
        *,
        groups: int = 1,
        bias: bool = False,
        nominal_size: int = 1,
        padding: Padding = "static",
    ) -> None:
        pad = same_pads(nominal_size, kernel, stride)
        self.pads: Pads = (pad[0], pad[1], pad[0], pad[1])
        symmetric = padding == "static" and pad[0] == pad[1]
        super().__init__(
            in_ch,
            out_ch,
            kernel,
            stride,
            padding=pad[0] if symmetric else 0,
            groups=groups,
            bias=bias,
        )
        self.dynamic = padding == "dynamic"
        self.explicit_pad = not symmetric and not self.dynamic and any(self.pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            k, s = self.kernel_size[0], self.stride[0]
            top, bottom = same_pads(x.shape[-2], k, s)
            left, right = same_pads(x.shape[-1], k, s)
            x = F.pad(x, (left, right, top, bottom))
        elif self.explicit_pad:
            x = F.pad(x, self.pads)
        return super().forward(x)


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x).

    Without autograd it is computed exactly as the reference does (F.silu differs in the last
    bits, enough to matter for parity); when gradients flow, fused F.silu saves memory and time.
    """
    if x.requires_grad and torch.is_grad_enabled():
        return F.silu(x)
    return x * torch.sigmoid(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def drop_connect(x: torch.Tensor, p: float) -> torch.Tensor:
    """Stochastic depth per sample (lukemelas `drop_connect`), training only."""
    keep = 1.0 - p
    mask = torch.floor(keep + torch.rand((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device))
    return x / keep * mask


class MBConvBlock(nn.Module):
    """Inverted residual block with squeeze-excitation (lukemelas `MBConvBlock`)."""

    def __init__(self, spec: BlockSpec, nominal_size: int, padding: Padding) -> None:
        super().__init__()
        self.spec = spec
        expanded = spec.in_ch * spec.expand
        if spec.expand != 1:
            self._expand_conv = SameConv2d(spec.in_ch, expanded, 1, padding=padding)
            self._bn0 = _bn(expanded)
        self._depthwise_conv = SameConv2d(
            expanded,
            expanded,
            spec.kernel,
            spec.stride,
            groups=expanded,
            nominal_size=nominal_size,
            padding=padding,
        )
        self._bn1 = _bn(expanded)
        squeezed = max(1, int(spec.in_ch * spec.se_ratio))
        self._se_reduce = nn.Conv2d(expanded, squeezed, 1)
        self._se_expand = nn.Conv2d(squeezed, expanded, 1)
        self._project_conv = SameConv2d(expanded, spec.out_ch, 1, padding=padding)
        self._bn2 = _bn(spec.out_ch)
        self.residual = spec.stride == 1 and spec.in_ch == spec.out_ch

    def forward(self, inputs: torch.Tensor, drop_connect_rate: float = 0.0) -> torch.Tensor:
        x = inputs
        if self.spec.expand != 1:
            x = swish(self._bn0(self._expand_conv(x)))
        x = swish(self._bn1(self._depthwise_conv(x)))
        gate = x.mean(dim=(2, 3), keepdim=True)
        gate = self._se_expand(swish(self._se_reduce(gate)))
        x = torch.sigmoid(gate) * x
        x = self._bn2(self._project_conv(x))
        if self.residual:
            if drop_connect_rate and self.training:
                x = drop_connect(x, drop_connect_rate)
            x = x + inputs
        return x


def block_specs(params: ArchParams) -> list[BlockSpec]:
    """The scaled per-block list: first block of a stage strides and changes channels."""
    specs = []
    for stage in B0_STAGES:
        in_ch = round_filters(stage.in_ch, params.width)
        out_ch = round_filters(stage.out_ch, params.width)
        for i in range(round_repeats(stage.repeats, params.depth)):
            specs.append(
                BlockSpec(
                    stage.kernel,
                    stage.stride if i == 0 else 1,
                    stage.expand,
                    in_ch if i == 0 else out_ch,
                    out_ch,
                    stage.se_ratio,
                )
            )
    return specs


class EfficientNet(nn.Module):
    """Mammo-CLIP image encoder: `forward(x)` returns the raw final map swish(bn1(conv_head)).

    Layers addressable by name: `stem`, `blocks.0` ... `blocks.N-1`, `final`
    (see `layer_info` for each one's stride and channels).
    """

    def __init__(self, params: ArchParams, *, padding: Padding = "static") -> None:
        super().__init__()
        if padding not in ("static", "dynamic"):
            raise MammoSaeError(choices_message("padding", padding, ["static", "dynamic"]))
        self.params = params
        self.arch = params.name
        self.padding = padding
        self.drop_connect_rate = params.drop_connect_rate

        size = params.image_size
        stem_ch = round_filters(B0_STEM, params.width)
        self._conv_stem = SameConv2d(3, stem_ch, 3, 2, nominal_size=size, padding=padding)
        self._bn0 = _bn(stem_ch)
        size = math.ceil(size / 2)
        stride = 2
        info = {"stem": LayerInfo(stride, stem_ch)}

        blocks = []
        for i, spec in enumerate(block_specs(params)):
            blocks.append(MBConvBlock(spec, size, padding))
            size = math.ceil(size / spec.stride)
            stride *= spec.stride
            info[f"blocks.{i}"] = LayerInfo(stride, spec.out_ch)
        self._blocks = nn.ModuleList(blocks)

        head_ch = round_filters(B0_HEAD, params.width)
        self._conv_head = SameConv2d(blocks[-1].spec.out_ch, head_ch, 1, padding=padding)
        self._bn1 = _bn(head_ch)
        info["final"] = LayerInfo(stride, head_ch)
        self.layer_info: dict[str, LayerInfo] = info
        self.out_channels = head_ch

    @property
    def layer_names(self) -> list[str]:
        return list(self.layer_info)

    def _block_drop_rate(self, idx: int) -> float:
        # lukemelas scales the rate linearly with depth; used only in training mode
        return self.drop_connect_rate * idx / len(self._blocks) if self.training else 0.0

    def forward_features(
        self, x_b3hw: torch.Tensor, layers: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Maps of the requested layers; stops after the last one needed."""
        if isinstance(layers, str):
            layers = [layers]
        self._check_layers(layers)
        wanted = set(layers)
        # blocks.i sits at position i + 1 in layer_names; run only the blocks up to the deepest request
        deepest = max((self.layer_names.index(name) for name in wanted), default=0)
        out: dict[str, torch.Tensor] = {}
        x = swish(self._bn0(self._conv_stem(x_b3hw)))
        if "stem" in wanted:
            out["stem"] = x
        for i, block in enumerate(itertools.islice(self._blocks, deepest)):
            x = block(x, self._block_drop_rate(i))
            if f"blocks.{i}" in wanted:
                out[f"blocks.{i}"] = x
        if "final" in wanted:
            out["final"] = swish(self._bn1(self._conv_head(x)))
        return out

    def forward_from(self, map_bchw: torch.Tensor, layer: str) -> torch.Tensor:
        """The final map computed from `layer`'s output by the rest of the network, so that an
        edited or reconstructed map at an earlier layer reaches the head (identity at final)."""
        self._check_layers([layer])
        channels = self.layer_info[layer].channels
        if map_bchw.ndim != 4 or map_bchw.shape[1] != channels:
            raise MammoSaeError(
                f"a {layer} map has {channels} channels (B, {channels}, h, w); "
                f"got shape {tuple(map_bchw.shape)}"
            )
        if layer == "final":
            return map_bchw
        # blocks.i's output feeds block i + 1; the stem's feeds block 0
        start = 0 if layer == "stem" else int(layer.split(".")[1]) + 1
        x = map_bchw
        for i in range(start, len(self._blocks)):
            x = self._blocks[i](x, self._block_drop_rate(i))
        return swish(self._bn1(self._conv_head(x)))

    def _check_layers(self, layers: Sequence[str]) -> None:
        unknown = [name for name in layers if name not in self.layer_info]
        if unknown:
            raise MammoSaeError(
                choices_message(
                    "layer",
                    unknown[0],
                    ["stem", "blocks.0", "...", f"blocks.{len(self._blocks) - 1}", "final"],
                )
            )

    def forward(self, x_b3hw: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x_b3hw, ["final"])["final"]

    def pooled(self, x_b3hw: torch.Tensor) -> torch.Tensor:
        """Spatial mean of the final map, (B, C)."""
        return self.forward(x_b3hw).mean(dim=(2, 3))

    def static_pads(self) -> dict[str, Pads]:
        """(left, right, top, bottom) pads of every convolution, by state-dict module name."""
        return {name: m.pads for name, m in self.named_modules() if isinstance(m, SameConv2d)}

    def output_hw(self, height: int, width: int, layer: str = "final") -> tuple[int, int]:
        """Map size for an input size, computed through the actual static pad/stride chain."""
        with torch.device("meta"):
            twin = EfficientNet(self.params, padding=self.padding)
            probe = torch.zeros(1, 3, height, width)
        h, w = twin.forward_features(probe, [layer])[layer].shape[-2:]
        return int(h), int(w)

    def receptive_field_centres(
        self, height: int, width: int, layer: str = "final"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Input-pixel coordinates of the receptive-field centre of each row and each column of
        `layer`'s map for a `height × width` input (pixel r's centre is at r).

        Walks the spatial convolutions in forward order: output index i of a convolution with
        kernel k, stride s and leading pad p sees inputs i·s − p … i·s − p + k − 1, centred at
        i·s − p + (k − 1)/2 (the pads are this model's static table, or per size if dynamic).
        1×1 convolutions and the squeeze-excitation gate (a global mean) move nothing.
        """
        if layer not in self.layer_info:
            raise MammoSaeError(choices_message("layer", layer, self.layer_names))
        n_blocks = {"stem": 0, "final": len(self._blocks)}.get(layer)
        if n_blocks is None:
            n_blocks = int(layer.split(".")[1]) + 1
        convs = [self._conv_stem] + [b._depthwise_conv for b in self._blocks[:n_blocks]]
        out = []
        for axis, size in ((0, int(height)), (1, int(width))):
            scale, offset = 1, 0.0
            for conv in convs:
                k, s = conv.kernel_size[axis], conv.stride[axis]
                before, after = (
                    same_pads(size, k, s)
                    if conv.dynamic
                    else conv.pads[2:]
                    if axis == 0
                    else conv.pads[:2]
                )
                offset += scale * ((k - 1) / 2 - before)
                scale *= s
                size = (size + before + after - k) // s + 1
            out.append(offset + scale * np.arange(size, dtype=np.float64))
        return out[0], out[1]


@contextlib.contextmanager
def inference_settings() -> Iterator[None]:
    """Inference context: no autograd bookkeeping and flush-to-zero denormals.

    Denormals appear in the SE/Swish path and slow CPU convolutions several-fold; flushing
    them does not change outputs measurably (the flag is process-wide and left on). Callers
    should also put the model in `eval()`; see `prepare_for_inference`.
    """
    torch.set_flush_denormal(True)
    with torch.inference_mode():
        yield


def prepare_for_inference(
    model: nn.Module, device: str | torch.device = "cpu", channels_last: bool = False
) -> nn.Module:
    """eval() + device + (optionally) channels_last memory format; returns the model.

    channels_last did not help on the 2-core dev CPU (benchmarks/encoder_speed.py); try it on GPUs.
    """
    model = model.eval().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
