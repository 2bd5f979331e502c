"""SAE checkpoints: native round trip, MammoSAE import (both key namings), SAELens export, errors, CLI."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import need_shared
from hypothesis import given, settings
from hypothesis import strategies as st

from mammo_sae.cli import main
from mammo_sae.errors import CheckpointError, MammoSaeError
from mammo_sae.sae.checkpoints import (
    export_saelens,
    from_mammosae_state_dict,
    load_sae,
    sae_sha256,
    save_sae,
)
from mammo_sae.sae.model import SAEConfig, SparseAutoencoder


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


def _trained_like(arch: str, normalisation: str = "none") -> SparseAutoencoder:
    sae = SparseAutoencoder(
        SAEConfig(architecture=arch, d=12, h=40, k=4, normalisation=normalisation), seed=1
    )
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.2)
        sae.W_dec.mul_(torch.rand(40) + 0.5)  # non-unit columns: must survive as stored
        sae.threshold.fill_(0.03)
        if normalisation != "none":
            sae.set_normalisation(torch.randn(12) + 1, 1.7)
    return sae.eval()


@pytest.mark.parametrize("arch", ["relu-l1", "topk", "batchtopk"])
def test_native_round_trip_is_exact(tmp_path, arch):
    sae = _trained_like(arch, "centre-scale")
    save_sae(
        sae,
        tmp_path / "s",
        extra={"source_store_manifest_sha256": "abc", "final_metrics": {"fvu": 0.1}},
    )
    meta = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert (
        meta["schema_version"] == 1
        and meta["architecture"] == arch
        and meta["d"] == 12
        and meta["h"] == 40
    )
    assert (
        meta["source_store_manifest_sha256"] == "abc"
        and meta["normalisation"]["mode"] == "centre-scale"
    )
    back = load_sae(tmp_path / "s")
    for name, value in sae.state_dict().items():
        assert torch.equal(value, back.state_dict()[name]), name
    x = torch.randn(20, 12) + 1
    assert torch.equal(sae(x)[1], back(x)[1])
    assert len(sae_sha256(tmp_path / "s")) == 64


@pytest.mark.parametrize("arch", ["relu-l1", "topk", "batchtopk"])
def test_saelens_export_loads_back_identically(tmp_path, arch):
    sae = _trained_like(arch, "centre")
    export_saelens(sae, tmp_path / "sl")
    files = sorted(p.name for p in (tmp_path / "sl").iterdir())
    assert files == ["cfg.json", "sae_weights.safetensors"]
    back = load_sae(tmp_path / "sl")
    x = torch.randn(25, 12) + 1
    z, x_hat = sae(x)
    z2, x_hat2 = back(x)
    assert torch.allclose(z, z2, atol=1e-5) and torch.allclose(x_hat, x_hat2, atol=1e-5)


@pytest.mark.parametrize("arch", ["relu-l1", "topk", "batchtopk"])
def test_saelens_itself_loads_the_export(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    sae = _trained_like(arch)
    export_saelens(sae, tmp_path / "sl")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"), device="cpu")
    x = torch.randn(25, 12)
    with torch.no_grad():
        z, x_hat = sae(x)
        assert torch.allclose(theirs.encode(x), z, atol=1e-5)
        assert torch.allclose(theirs.decode(theirs.encode(x)), x_hat, atol=1e-5)


def _mammosae_state_dict(sae: SparseAutoencoder, later_names: bool) -> dict[str, torch.Tensor]:
    tied = sae.b_dec.detach()[None].clone()
    names = (
        ("encoder.weight", "encoder.bias", "decoder.weight")
        if later_names
        else ("encoder._weight", "encoder._bias", "decoder._weight")
    )
    return {
        "tied_bias": tied,
        "pre_encoder_bias._bias_reference": tied,
        names[0]: sae.W_enc.detach()[None].clone(),
        names[1]: sae.b_enc.detach()[None].clone(),
        names[2]: sae.W_dec.detach()[None].clone(),
        "post_decoder_bias._bias_reference": tied,
    }


@pytest.mark.parametrize("later_names", [False, True])
def test_mammosae_layouts_import_and_export(tmp_path, later_names):
    sae = _trained_like("relu-l1")
    torch.save(_mammosae_state_dict(sae, later_names), tmp_path / "sparse_autoencoder_final.pt")
    loaded = load_sae(tmp_path / "sparse_autoencoder_final.pt")
    assert torch.equal(loaded.W_dec, sae.W_dec)  # not renormalised
    assert (
        main(
            [
                "sae",
                "import",
                "--src",
                str(tmp_path / "sparse_autoencoder_final.pt"),
                "--out",
                str(tmp_path / "native"),
            ]
        )
        == 0
    )
    assert (
        main(["sae", "export", "--sae", str(tmp_path / "native"), "--out", str(tmp_path / "sl")])
        == 0
    )
    x = torch.randn(9, 12)
    for p in ("native", "sl"):
        assert torch.allclose(load_sae(tmp_path / p)(x)[1], sae(x)[1], atol=1e-6), p
    assert main(["sae", "info", "--sae", str(tmp_path / "native")]) == 0


def test_mammosae_fixture_imports(tmp_path, capsys):
    path = need_shared("fixtures", "reference", "mammosae_mini_sparse_autoencoder_final.pt")
    assert main(["sae", "import", "--src", str(path), "--out", str(tmp_path / "n")]) == 0
    assert main(["sae", "info", "--sae", str(tmp_path / "n")]) == 0
    info = json.loads(capsys.readouterr().out.split("}\n", 1)[1])
    assert info["d"] == 64 and info["h"] == 512 and info["cfg.json"]["imported_from"]["sha256"]


def test_inconsistent_mammosae_files_are_refused():
    sae = _trained_like("relu-l1")
    sd = _mammosae_state_dict(sae, False)
    sd["post_decoder_bias._bias_reference"] = sd["tied_bias"] + 1
    with pytest.raises(CheckpointError, match="aliased"):
        from_mammosae_state_dict(sd)
    sd = _mammosae_state_dict(sae, False)
    sd["decoder._weight"] = sd["decoder._weight"][:, :, :-1]
    with pytest.raises(CheckpointError, match="shapes"):
        from_mammosae_state_dict(sd)


def test_corrupt_and_missing_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_sae(tmp_path / "nope")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_sae(tmp_path / "garbage.pt")
    save_sae(_trained_like("relu-l1"), tmp_path / "s")
    weights = tmp_path / "s" / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="checksum|corrupt"):
        load_sae(tmp_path / "s")
    assert main(["sae", "info", "--sae", str(tmp_path / "s")]) == 2
    with pytest.raises(MammoSaeError, match="overwrite"):
        save_sae(_trained_like("relu-l1"), tmp_path / "t", extra={"d": 3})


def test_nan_weights_are_refused(tmp_path):
    sae = _trained_like("relu-l1")
    with torch.no_grad():
        sae.W_enc[0, 0] = float("nan")
    save_sae(sae, tmp_path / "s")
    with pytest.raises(CheckpointError, match="NaN"):
        load_sae(tmp_path / "s")


def test_cfg_json_alone_points_to_the_directory(tmp_path):
    save_sae(_trained_like("topk"), tmp_path / "s")
    assert isinstance(load_sae(Path(tmp_path / "s" / "cfg.json")), SparseAutoencoder)


@settings(max_examples=30, deadline=None)
@given(
    arch=st.sampled_from(["relu-l1", "topk", "batchtopk"]),
    d=st.integers(1, 9),
    h=st.integers(1, 30),
    k=st.integers(1, 5),
    normalisation=st.sampled_from(["none", "centre", "centre-scale"]),
    seed=st.integers(0, 999),
)
def test_every_route_round_trips_any_config(arch, d, h, k, normalisation, seed):
    """Native save/load is exact for any shape; the SAELens export encodes and decodes the same
    (normalisation folded); relu-l1 also survives the MammoSAE layout."""
    sae = SparseAutoencoder(
        SAEConfig(architecture=arch, d=d, h=h, k=min(k, h), normalisation=normalisation), seed=seed
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.2, generator=gen)
        sae.threshold.fill_(0.01)
        if normalisation != "none":
            sae.set_normalisation(
                torch.randn(d, generator=gen), 0.5 + float(torch.rand(1, generator=gen))
            )
    sae.eval()
    x = torch.randn(7, d, generator=gen)
    z, x_hat = sae(x)[:2]
    with tempfile.TemporaryDirectory() as tmp:
        save_sae(sae, Path(tmp) / "native")
        back = load_sae(Path(tmp) / "native")
        assert all(torch.equal(v, back.state_dict()[n]) for n, v in sae.state_dict().items())
        export_saelens(sae, Path(tmp) / "sl")
        z_sl, x_hat_sl = load_sae(Path(tmp) / "sl")(x)[:2]
        assert torch.allclose(z_sl, z, atol=1e-5) and torch.allclose(x_hat_sl, x_hat, atol=1e-5)
        if arch == "relu-l1" and normalisation == "none":
            torch.save(_mammosae_state_dict(sae, later_names=seed % 2 == 1), Path(tmp) / "m.pt")
            assert torch.equal(load_sae(Path(tmp) / "m.pt")(x)[1], x_hat)


@settings(max_examples=25, deadline=None)
@given(where=st.floats(0.0, 1.0, exclude_max=True, allow_subnormal=False), bit=st.integers(0, 7))
def test_any_flipped_bit_in_the_weights_is_refused(where, bit):
    with tempfile.TemporaryDirectory() as tmp:
        save_sae(_trained_like("relu-l1"), Path(tmp) / "s")
        weights = Path(tmp) / "s" / "sae.safetensors"
        raw = bytearray(weights.read_bytes())
        raw[int(where * len(raw))] ^= 1 << bit
        weights.write_bytes(bytes(raw))
        with pytest.raises(CheckpointError, match="sae.safetensors"):
            load_sae(Path(tmp) / "s")
