"""EfficientNet architecture: key layout, static SAME padding tables, layer taps, classifier head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mammo_sae.errors import MammoSaeError
from mammo_sae.models.classifier import ConceptClassifier
from mammo_sae.models.efficientnet import EfficientNet, LayerInfo, SameConv2d, inference_settings
from mammo_sae.models.registry import arch_params, create_encoder, list_archs


def meta_encoder(arch: str) -> EfficientNet:
    with torch.device("meta"):
        return create_encoder(arch)


@pytest.mark.parametrize(
    "arch, n_keys, n_params, channels, n_blocks",
    [
        ("efficientnet-b5", 852, 28_340_784, 2048, 39),
        ("efficientnet-b2", 506, 7_700_994, 1408, 23),
    ],
)
def test_mammo_clip_encoders_match_reference_counts(
    arch: str, n_keys: int, n_params: int, channels: int, n_blocks: int
) -> None:
    enc = meta_encoder(arch)
    sd = enc.state_dict()
    assert len(sd) == n_keys
    assert sum(p.numel() for p in enc.parameters()) == n_params
    assert enc.out_channels == channels and len(enc._blocks) == n_blocks
    assert not any(k.startswith("_fc") for k in sd)
    assert "_blocks.0._expand_conv.weight" not in sd  # e = 1 stage has no expansion
    assert (
        sd["_blocks.3._expand_conv.weight"].shape[1]
        == sd["_blocks.2._project_conv.weight"].shape[0]
    )


# Stride-2 convolutions' (left, right, top, bottom) pads, reference §2.5.
B5_STRIDE2_PADS = {
    "_conv_stem": (0, 1, 0, 1),
    "_blocks.3._depthwise_conv": (0, 1, 0, 1),
    "_blocks.8._depthwise_conv": (1, 2, 1, 2),
    "_blocks.13._depthwise_conv": (1, 1, 1, 1),
    "_blocks.27._depthwise_conv": (2, 2, 2, 2),
}
B2_STRIDE2_PADS = {
    "_conv_stem": (0, 1, 0, 1),
    "_blocks.2._depthwise_conv": (0, 1, 0, 1),
    "_blocks.5._depthwise_conv": (2, 2, 2, 2),
    "_blocks.8._depthwise_conv": (1, 1, 1, 1),
    "_blocks.16._depthwise_conv": (2, 2, 2, 2),
}


@pytest.mark.parametrize(
    "arch, table", [("efficientnet-b5", B5_STRIDE2_PADS), ("efficientnet-b2", B2_STRIDE2_PADS)]
)
def test_static_pad_table(arch: str, table: dict[str, tuple[int, int, int, int]]) -> None:
    enc = meta_encoder(arch)
    pads = enc.static_pads()
    convs = dict(enc.named_modules())
    stride2 = {name: p for name, p in pads.items() if convs[name].stride[0] == 2}
    assert stride2 == table
    for name, p in pads.items():
        if name in table:
            continue
        k = convs[name].kernel_size[0]
        assert p == ((k - 1) // 2,) * 4, name  # stride 1: k3 -> 1, k5 -> 2, 1x1 -> 0 on every side


@pytest.mark.parametrize("arch", ["efficientnet-b5", "efficientnet-b2"])
@pytest.mark.parametrize("hw, out_hw", [((1520, 912), (48, 29)), ((512, 320), (16, 10))])
def test_final_map_size(arch: str, hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    assert meta_encoder(arch).output_hw(*hw) == out_hw


def test_static_pads_do_not_follow_input_size() -> None:
    # k5/s2 built for nominal 65 pads (2,2); TF dynamic SAME on a 64-wide input would pad (1,2)
    torch.manual_seed(0)
    static = SameConv2d(2, 3, 5, 2, nominal_size=65)
    dynamic = SameConv2d(2, 3, 5, 2, nominal_size=65, padding="dynamic")
    dynamic.load_state_dict(static.state_dict())
    x = torch.randn(1, 2, 64, 64)
    expected = F.conv2d(F.pad(x, (2, 2, 2, 2)), static.weight, stride=2)
    torch.testing.assert_close(static(x), expected, rtol=0, atol=0)
    assert static(x).shape[-1] == 32
    assert not torch.allclose(dynamic(x), expected)


def test_asymmetric_static_pad_changes_odd_output_size() -> None:
    # B5 block 8 pads (1,2) statically: an odd input n gives (n - 1) / 2, not ceil(n / 2)
    conv = SameConv2d(1, 1, 5, 2, nominal_size=114)
    assert conv.pads == (1, 2, 1, 2)
    assert conv(torch.zeros(1, 1, 57, 57)).shape[-1] == 28


@pytest.fixture(scope="module")
def phantom() -> EfficientNet:
    torch.manual_seed(0)
    return create_encoder("efficientnet-phantom").eval()


def test_forward_features_names_shapes_and_final(phantom: EfficientNet) -> None:
    x = torch.randn(2, 3, 64, 96)
    names = phantom.layer_names
    assert names[0] == "stem" and names[-1] == "final" and names[1] == "blocks.0"
    with inference_settings():
        maps = phantom.forward_features(x, names)
        final = phantom(x)
    for name, info in phantom.layer_info.items():
        assert maps[name].shape[:2] == (2, info.channels), name
        assert maps[name].shape[-1] == -(-96 // info.stride), name  # stride matches the map
    assert phantom.layer_info["final"].channels == phantom.out_channels
    torch.testing.assert_close(maps["final"], final, rtol=0, atol=0)


def test_forward_features_stops_after_last_requested(phantom: EfficientNet) -> None:
    calls: list[int] = []
    hooks = [
        b.register_forward_hook(lambda m, i, o, n=n: calls.append(n))
        for n, b in enumerate(phantom._blocks)
    ]
    try:
        with torch.inference_mode():
            out = phantom.forward_features(torch.randn(1, 3, 64, 64), ["stem", "blocks.1"])
    finally:
        for h in hooks:
            h.remove()
    assert set(out) == {"stem", "blocks.1"} and calls == [0, 1]


def test_unknown_layer_and_arch_are_named(phantom: EfficientNet) -> None:
    with pytest.raises(MammoSaeError, match="blocks.99"):
        phantom.forward_features(torch.zeros(1, 3, 32, 32), ["blocks.99"])
    with pytest.raises(MammoSaeError, match="efficientnet-b5"):
        create_encoder("efficientnet-b9")
    assert set(list_archs()) >= {f"efficientnet-b{i}" for i in range(6)} | {"efficientnet-phantom"}


def test_batchnorm_settings_and_drop_connect_only_in_training() -> None:
    torch.manual_seed(0)
    enc = create_encoder("efficientnet-phantom")
    bns = [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)
    x = torch.randn(2, 3, 32, 32)
    enc.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc(x), enc(x), rtol=0, atol=0)
    enc.train()
    for m in bns:
        m.momentum = 0.0  # keep running stats fixed so only drop-connect can differ
    torch.manual_seed(1)
    a = enc(x)
    torch.manual_seed(2)
    b = enc(x)
    assert not torch.allclose(a, b)
    a.mean().backward()
    assert enc._conv_stem.weight.grad is not None


def test_classifier_head_is_linear_on_spatial_mean(phantom: EfficientNet) -> None:
    torch.manual_seed(0)
    clf = ConceptClassifier(phantom, 4, concept="density").eval()
    x = torch.randn(2, 3, 96, 64)
    with torch.inference_mode():
        final = clf.features(x)
        logits = clf(x)
        expected = final.mean(dim=(2, 3)) @ clf.head.weight.T + clf.head.bias
        torch.testing.assert_close(logits, expected)
        torch.testing.assert_close(clf.pooled(x), final.mean(dim=(2, 3)))
        torch.testing.assert_close(clf.logits_from_map(final), logits)
    assert logits.shape == (2, 4) and clf.arch == "efficientnet-phantom"


def test_channels_last_gives_same_features(phantom: EfficientNet) -> None:
    x = torch.randn(1, 3, 96, 64)
    with inference_settings():
        ref = phantom(x)
        cl = phantom.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last)
        )
    phantom.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)


def test_phantom_arch_is_documented_size() -> None:
    params = arch_params("efficientnet-phantom")
    enc = meta_encoder("efficientnet-phantom")
    assert params.image_size == 256 and enc.out_channels == 640 and len(enc._blocks) == 10


def test_b5_runs_at_512x320() -> None:
    # random weights: only the real (non-meta) shape path of the B5 pad table is checked here;
    # numerical exactness is the B2 parity test's job (same code, B5 differs only in its table)
    torch.manual_seed(0)
    enc = create_encoder("efficientnet-b5").eval()
    with inference_settings():
        out = enc.forward_features(torch.randn(1, 3, 512, 320), ["blocks.13", "final"])
    assert out["final"].shape == (1, 2048, 16, 10)
    assert out["blocks.13"].shape == (1, 128, 32, 20) and enc.layer_info["blocks.13"] == LayerInfo(
        16, 128
    )


def test_swish_training_path_matches_reference_formula() -> None:
    from mammo_sae.models.efficientnet import swish

    x = torch.linspace(-20, 20, 1001, requires_grad=True)
    y = swish(x)  # fused F.silu while gradients flow
    with torch.no_grad():
        ref = swish(x)  # x * sigmoid(x), as the reference computes it
    torch.testing.assert_close(y.detach(), ref, rtol=1e-6, atol=1e-7)
    y.sum().backward()
    s = torch.sigmoid(x.detach())
    torch.testing.assert_close(x.grad, s * (1 + x.detach() * (1 - s)), rtol=1e-5, atol=1e-6)
