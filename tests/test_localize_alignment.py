"""Heatmap alignment: a map cell's value must land on the input pixels that cell looks at.

The receptive-field centre of each final-layer cell is computed from the encoder's strides and
static pads (`EfficientNet.receptive_field_centres`) and checked against the network itself: with
every spatial kernel a centred delta and the squeeze-excitation gate switched off, a final cell
depends on exactly one input pixel, its receptive-field centre, which the input gradient finds.
Then a map with one hot cell, upsampled as the localisation does, must peak on that pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mammo_sae.analysis.maps import heatmap_centres, receptive_field_centres, upsample
from mammo_sae.errors import MammoSaeError, StoreError
from mammo_sae.models.efficientnet import SameConv2d
from mammo_sae.models.registry import create_encoder

# (arch, input size): the phantom member at an odd size (its static pads do not depend on the
# input, so this stands for the demo's 256x160 too) and B2, whose nominal 260 gives another pad
# table; B5's (nominal 456) is checked on the meta device below.
CASES = [("efficientnet-phantom", (100, 70)), ("efficientnet-b2", (70, 40))]


def _delta_encoder(arch: str) -> torch.nn.Module:
    enc = create_encoder(arch).eval().requires_grad_(False)
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, SameConv2d) and m.kernel_size[0] > 1:
                k = m.kernel_size[0]
                m.weight.zero_()
                m.weight[:, :, k // 2, k // 2] = 1.0
        for block in enc._blocks:  # gate = sigmoid(bias): constant, no spatial mixing
            block._se_reduce.weight.zero_()
            block._se_expand.weight.zero_()
    return enc


@pytest.mark.parametrize("arch,size", CASES)
def test_receptive_field_centres_match_the_network(arch: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    enc = _delta_encoder(arch)
    rows, cols = enc.receptive_field_centres(*size)
    assert (len(rows), len(cols)) == enc.output_hw(*size)
    # A constant input makes every cell the same function of its one source pixel, so one
    # backward of the sum over all cells marks exactly the set of source pixels.
    x = torch.full((1, 3, *size), 0.3, requires_grad=True)
    enc(x).sum().backward()
    src = torch.nonzero(x.grad[0].abs().sum(0)).numpy()
    inside = [(r, c) for r in rows for c in cols if r < size[0] and c < size[1]]
    assert sorted(map(tuple, src.tolist())) == sorted(inside)
    assert len(inside) == len(rows) * len(cols)  # every centre lies inside these frames


def test_receptive_field_centres_of_b5_and_the_phantom_member() -> None:
    with torch.device("meta"):
        b5, phantom = create_encoder("efficientnet-b5"), create_encoder("efficientnet-phantom")
    rows, cols = b5.receptive_field_centres(1520, 912)
    np.testing.assert_array_equal(rows, 32 * np.arange(48) + 7)
    np.testing.assert_array_equal(cols, 32 * np.arange(29) + 7)
    rows, cols = phantom.receptive_field_centres(256, 160)
    np.testing.assert_array_equal(rows, 32 * np.arange(8) + 31)
    np.testing.assert_array_equal(cols, 32 * np.arange(5) + 31)
    with pytest.raises(MammoSaeError, match="layer"):
        phantom.receptive_field_centres(256, 160, "nope")


class _Store:
    def __init__(self, arch: str, layer: str = "final") -> None:
        self.manifest = {"model": {"arch": arch}, "layer": layer}


@pytest.mark.parametrize(
    "arch,size", CASES + [("efficientnet-phantom", (256, 160)), ("efficientnet-b5", (1520, 912))]
)
def test_a_hot_cell_lights_its_receptive_field_centre(arch: str, size: tuple[int, int]) -> None:
    """The heatmap of a one-hot map peaks on the cell's receptive-field centre (to the pixel;
    the issue asked for half a cell, and the released `align_corners=False` misses by 15.5 px
    on the phantom encoder)."""
    with torch.device("meta"):
        grid = create_encoder(arch).output_hw(*size)
    centres = heatmap_centres(_Store(arch), size, grid)
    assert centres is not None
    cells = [(i, j) for i in range(grid[0]) for j in range(grid[1])]
    if len(cells) > 12:  # B5: corners, edges and the middle are enough
        cells = [(0, 0), (grid[0] // 2, grid[1] // 2), (grid[0] - 1, grid[1] - 1), (0, grid[1] - 1)]
    stack = np.zeros((len(cells), *grid), dtype=np.float32)
    for n, (i, j) in enumerate(cells):
        stack[n, i, j] = 1.0
    heats = upsample(stack, size, centres)
    for n, (i, j) in enumerate(cells):
        want = (int(min(centres[0][i], size[0] - 1)), int(min(centres[1][j], size[1] - 1)))
        assert heats[n][want] == pytest.approx(1.0), (arch, size, (i, j))
        # Between two centres the value falls off, so an inner cell peaks on its centre alone
        # (an outer cell's value is held up to the frame's edge, where no cell is centred).
        peak_r, peak_c = np.nonzero(heats[n] >= 1.0 - 1e-6)
        if 0 < i < grid[0] - 1:
            assert set(peak_r) == {want[0]}, (arch, size, (i, j))
        if 0 < j < grid[1] - 1:
            assert set(peak_c) == {want[1]}, (arch, size, (i, j))
    # The even (released) layout puts the phantom encoder's middle cell 15.5 px too early.
    if arch == "efficientnet-phantom" and size == (256, 160):
        i, j = cells[len(cells) // 2]
        even = upsample(stack[len(cells) // 2], size)
        peak = np.unravel_index(np.argmax(even), size)
        assert abs(peak[0] - (32 * i + 15.5)) == abs(peak[1] - (32 * j + 15.5)) == 0.5
        assert (centres[0][i], centres[1][j]) == (32 * i + 31, 32 * j + 31)


def test_centres_come_from_the_store_and_must_fit_its_grid() -> None:
    assert receptive_field_centres(_Store("synthetic"), (256, 160), (8, 5)) is None
    assert heatmap_centres(_Store("efficientnet-phantom"), (256, 160), (8, 5), "even") is None
    with pytest.raises(StoreError, match="8x5 grid, but the store has 4x3"):
        receptive_field_centres(_Store("efficientnet-phantom"), (256, 160), (4, 3))
    with pytest.raises(MammoSaeError, match="cell alignment"):
        heatmap_centres(_Store("efficientnet-phantom"), (256, 160), (8, 5), "middle")


def test_upsample_between_centres_is_linear_and_constant_outside() -> None:
    centres = (np.array([31.0, 63.0]), np.array([31.0]))
    heat = upsample(np.array([[0.0], [1.0]], dtype=np.float32), (96, 40), centres)
    np.testing.assert_allclose(heat[:32, 0], 0.0)
    np.testing.assert_allclose(heat[47, :], 0.5)
    np.testing.assert_allclose(heat[63:, 3], 1.0)
    assert (np.diff(heat[31:64, 0]) > 0).all()
    with pytest.raises(MammoSaeError, match="3 cell centres"):
        upsample(np.zeros((2, 1)), (96, 40), (np.array([1.0, 2.0, 3.0]), np.array([1.0])))


@pytest.mark.parametrize("layer", ["stem", "blocks.0", "blocks.2", "blocks.4", "blocks.6"])
def test_receptive_field_centres_of_earlier_layers(layer: str) -> None:
    """Stores extracted at `stem` or `blocks.N` (the localisation-by-layer study) place each
    cell at its receptive-field centre too: the delta network's gradient from that layer's map
    lands exactly on the centres the table gives for that layer (and its grid is the layer's)."""
    size = (100, 70)
    enc = _delta_encoder("efficientnet-phantom")
    rows, cols = enc.receptive_field_centres(*size, layer)
    assert (len(rows), len(cols)) == enc.output_hw(*size, layer)
    x = torch.full((1, 3, *size), 0.3, requires_grad=True)
    enc.forward_features(x, [layer])[layer].sum().backward()
    src = torch.nonzero(x.grad[0].abs().sum(0)).numpy()
    inside = [(r, c) for r in rows for c in cols if r < size[0] and c < size[1]]
    assert sorted(map(tuple, src.tolist())) == sorted(inside)
    # The store's manifest names the layer: its centres, not the final layer's, are used.
    grid = (len(rows), len(cols))
    got = heatmap_centres(_Store("efficientnet-phantom", layer), size, grid)
    assert got is not None
    np.testing.assert_array_equal(got[0], rows)
    np.testing.assert_array_equal(got[1], cols)
