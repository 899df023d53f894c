"""Tests of NegationBank: constructors, normalisation, persistence, cache and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from safedenoise import NegationBank, channel_l2_normalise
from tiny_models import tiny_sd_pipeline


def _write_images(folder: Path, count: int, size: int = 16, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"img_{index:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_channel_l2_gives_unit_channel_vectors() -> None:
    latents = torch.randn(3, 4, 5, 6) * 7
    normalised = channel_l2_normalise(latents)
    norms = normalised.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    assert torch.equal(channel_l2_normalise(torch.zeros(1, 4, 2, 2)), torch.zeros(1, 4, 2, 2))


def test_from_tensor_subsample_is_deterministic() -> None:
    latents = torch.arange(50, dtype=torch.float32).reshape(50, 1, 1, 1).expand(50, 2, 1, 1).contiguous()
    first = NegationBank.from_tensor(latents, max_size=10, subsample_seed=3)
    second = NegationBank.from_tensor(latents, max_size=10, subsample_seed=3)
    other = NegationBank.from_tensor(latents, max_size=10, subsample_seed=4)
    assert len(first) == 10
    assert torch.equal(first.latents, second.latents)
    assert not torch.equal(first.latents, other.latents)
    values = first.latents[:, 0, 0, 0]
    assert bool((values[1:] > values[:-1]).all()), "subsample keeps source order"
    assert first.provenance["count"] == 10


def test_save_load_round_trip(tmp_path: Path) -> None:
    bank = NegationBank.from_tensor(torch.randn(5, 4, 8, 8), provenance={"note": "unit test"}, normalisation="channel_l2")
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    loaded = NegationBank.load(path)
    assert torch.equal(loaded.latents, bank.latents)
    assert loaded.provenance == json.loads(json.dumps(bank.provenance))
    assert loaded.provenance["normalisation"] == "channel_l2"
    assert loaded.content_sha256 == bank.content_sha256


def test_load_rejects_foreign_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"latents": torch.zeros(2, 3)}, str(path))
    with pytest.raises(ValueError, match="not a negation bank file"):
        NegationBank.load(path)


def test_from_images_folder_hashes_files(tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "neg", 4)
    bank = NegationBank.from_images(tmp_path / "neg")
    assert bank.latents.shape == (4, 3, 16, 16)
    assert bank.latents.min() >= -1
    assert bank.latents.max() <= 1
    assert bank.provenance["files"] == [p.name for p in paths]
    assert len(bank.provenance["file_sha256"]) == 4
    assert bank.provenance["encoder"] is None


def test_from_images_cache_reuses_file(tmp_path: Path) -> None:
    _write_images(tmp_path / "neg", 3)
    calls = []

    def encode(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        return batch[:, :2, ::2, ::2] * 3

    first = NegationBank.from_images(tmp_path / "neg", encode, encoder_name="half", cache_dir=tmp_path / "cache")
    second = NegationBank.from_images(tmp_path / "neg", encode, encoder_name="half", cache_dir=tmp_path / "cache")
    assert calls == [3], "the second build must load the cached bank instead of encoding"
    assert torch.equal(first.latents, second.latents)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    NegationBank.from_images(tmp_path / "neg", encode, encoder_name="half", encoder_config={"v": 2}, cache_dir=tmp_path / "cache")
    assert calls == [3, 3], "a different encoder config is a different cache entry"

    _write_images(tmp_path / "neg", 3, seed=1)  # same names, new content
    NegationBank.from_images(tmp_path / "neg", encode, encoder_name="half", cache_dir=tmp_path / "cache")
    assert calls == [3, 3, 3], "changed file content must miss the cache"


def test_from_images_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no image files"):
        NegationBank.from_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        NegationBank.from_images(tmp_path / "missing")

    _write_images(tmp_path / "mixed", 2, size=16)
    Image.new("RGB", (20, 20)).save(tmp_path / "mixed" / "img_999.png")
    with pytest.raises(ValueError, match="pass image_size"):
        NegationBank.from_images(tmp_path / "mixed")
    assert NegationBank.from_images(tmp_path / "mixed", image_size=8).latents.shape == (3, 3, 8, 8)

    _write_images(tmp_path / "broken", 1)
    (tmp_path / "broken" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read negation image .*bad.png"):
        NegationBank.from_images(tmp_path / "broken")

    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        NegationBank.from_images(torch.full((2, 3, 8, 8), 255.0))
    with pytest.raises(ValueError, match="cache_dir needs encoder_name"):
        NegationBank.from_images(torch.zeros(2, 3, 8, 8), lambda x: x, cache_dir=tmp_path / "c")


def test_from_vae_scales_latents_and_caches(tmp_path: Path) -> None:
    vae = tiny_sd_pipeline().vae
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    bank = NegationBank.from_vae(images, vae, sample_mode="mean", batch_size=2)
    with torch.no_grad():
        expected = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    assert bank.latents.shape == (3, 4, 16, 16)
    assert torch.allclose(bank.latents, expected, atol=1e-5)

    sampled_a = NegationBank.from_vae(images, vae, seed=5, batch_size=1)
    sampled_b = NegationBank.from_vae(images, vae, seed=5, batch_size=3)
    assert torch.allclose(sampled_a.latents, sampled_b.latents, atol=1e-5), "batch size must not change samples"
    assert not torch.allclose(sampled_a.latents, bank.latents)

    cached = NegationBank.from_vae(
        images, vae, sample_mode="mean", cache_dir=tmp_path, normalisation="channel_l2", source="random pixels"
    )
    assert cached.provenance["source"] == "random pixels"
    assert cached.provenance["encoder"] == "AutoencoderKL"
    again = NegationBank.from_vae(images, vae, sample_mode="mean", cache_dir=tmp_path, normalisation="channel_l2")
    assert torch.equal(cached.latents, again.latents)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)  # new weights: a new cache entry
    NegationBank.from_vae(images, vae, sample_mode="mean", cache_dir=tmp_path, normalisation="channel_l2")
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_bank_rejects_bad_latents() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        NegationBank(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="NaN"):
        NegationBank(torch.tensor([[float("nan"), 0.0]]))
