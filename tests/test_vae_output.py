"""Decoding: sliced and tiled VAE decoding on request, and NaN/inf outputs as errors, never
black images."""
import pytest
import torch

from lumen import engine
from lumen.engine import InvalidInputError, InvalidTypeError, NonFiniteOutputError

from conftest import make_tiny_unet


def image(eng, n=1, size=16, output_type="pt", seed=0):
    return eng.run(prompt="a cat", num_images_per_prompt=n, height=size, width=size,
                   num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                   output_type=output_type).images


@pytest.fixture(scope="module")
def plain(tiny_pipeline_dir):
    return engine.build(str(tiny_pipeline_dir), device="cpu")


def count_calls(module, name):
    calls = []
    original = getattr(module, name)
    setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_sliced_decoding_gives_the_same_images(plain, tiny_pipeline_dir):
    sliced = engine.build(str(tiny_pipeline_dir), device="cpu", vae_slicing=True)
    decodes = count_calls(sliced.components.vae, "_decode")
    ours = image(sliced, n=3)
    assert len(decodes) == 3  # one decoder call per image
    # the same latents; only the decoder's batched kernels differ, at fp32 rounding level
    torch.testing.assert_close(ours, image(plain, n=3), rtol=0, atol=1e-5)


def test_tiled_decoding_is_diffusers_tiled_decode_and_close_to_whole(plain, tiny_pipeline_dir):
    tiled = engine.build(str(tiny_pipeline_dir), device="cpu", vae_tiling=True)
    vae = tiled.components.vae
    vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 16  # diffusers' own tile settings
    tiles = count_calls(vae.decoder, "forward")
    ours, whole = image(tiled, size=48), image(plain, size=48)
    # 24x24 latents in 16x16 tiles with a 25% overlap (a stride of 12): a 2x2 grid
    assert ours.shape == whole.shape == (1, 3, 48, 48) and len(tiles) == 4
    x0 = image(plain, size=48, output_type="latent")
    with torch.no_grad():
        theirs = (vae.tiled_decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # Tiles differ from the whole image where the decoder's GroupNorm statistics, computed per
    # tile, differ; on this random-weight VAE, measured: mean 0.022, max 0.25 (image std 0.17).
    diff = (ours - whole).abs()
    assert float(diff.mean()) < 0.05 and float(diff.max()) < 0.4, (float(diff.mean()), float(diff.max()))


def test_nan_in_the_final_latents_is_an_error_naming_the_stage_and_dtype(plain):
    nan_model = engine.Engine(plain.components, plain.config, lambda x, t, e: torch.full_like(x, torch.nan),
                              plain.device, plain.dtype)
    for output_type in ("latent", "pil"):
        with pytest.raises(NonFiniteOutputError, match=r"NaN or inf in the final latents: 256 of 256 "
                                                       r"values, computed in float32"):
            image(nan_model, output_type=output_type)


def test_inf_from_the_vae_is_an_error_naming_the_decode(tiny_pipeline_dir):
    eng = engine.build(str(tiny_pipeline_dir), device="cpu")
    with torch.no_grad():
        eng.components.vae.post_quant_conv.bias.fill_(torch.inf)
    assert torch.isfinite(image(eng, output_type="latent")).all()
    with pytest.raises(NonFiniteOutputError, match=r"NaN or inf in the decoded image: .* computed in "
                                                   r"float32; the VAE overflowed"):
        image(eng)


@pytest.mark.parametrize("options, error, message", [
    (dict(vae_slicing=True), InvalidInputError, r"vae_slicing=True, but this model has no VAE"),
    (dict(vae_tiling=True), InvalidInputError, r"vae_tiling=True, but this model has no VAE"),
    (dict(vae_tiling="yes"), InvalidTypeError, r"vae_tiling='yes'; expected True or False"),
])
def test_bad_vae_options_are_refused(options, error, message):
    with pytest.raises(error, match=message):
        engine.build(make_tiny_unet(), device="cpu", **options)
