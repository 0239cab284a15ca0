"""A full engine run on the onnxruntime backend equals the torch backend."""
import pytest
import torch

from lumen import engine

pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs onnxruntime")


@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_run_on_onnxruntime_matches_torch(tiny_unet, tmp_path, guidance_scale):
    ort = engine.build(tiny_unet, backend="onnxruntime", device="cpu",
                       backend_options={"cache_dir": tmp_path})
    ref = engine.build(tiny_unet, device="cpu")
    g = torch.Generator().manual_seed(0)
    args = dict(prompt_embeds=torch.randn(2, 7, 32, generator=g), negative_prompt_embeds=torch.randn(2, 7, 32, generator=g),
                num_inference_steps=4, guidance_scale=guidance_scale, output_type="latent")
    a = ort.run(**args, generator=torch.Generator().manual_seed(1)).images
    b = ref.run(**args, generator=torch.Generator().manual_seed(1)).images
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert float(b.std()) > 0.1
    with pytest.raises(engine.InvalidInputError, match="cache_interval=2 with backend='onnxruntime'"):
        ort.run(**args, cache_interval=2)  # DeepCache's shallow branch is not exported


def test_backend_options_are_refused_for_torch(tiny_unet):
    with pytest.raises(engine.InvalidInputError, match="backend_options"):
        engine.build(tiny_unet, backend_options={"cache_dir": "/tmp"})


def test_nine_channel_inpainting_unet_on_onnxruntime_matches_torch(tmp_path):
    """The export takes [latents, mask, masked-image latents] (9 channels) and returns 4."""
    from conftest import make_tiny_pipeline, make_tiny_unet

    pipe = make_tiny_pipeline(make_tiny_unet(seed=4, in_channels=9, out_channels=4))
    ort = engine.build(pipe, backend="onnxruntime", device="cpu", backend_options={"cache_dir": tmp_path})
    ref = engine.build(pipe, device="cpu")
    g = torch.Generator().manual_seed(2)
    image, mask = torch.rand(1, 3, 16, 16, generator=g), torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    args = dict(prompt="a cat", image=image, mask_image=mask, strength=0.75, num_inference_steps=4,
                output_type="latent")
    a = ort.run(**args, generator=torch.Generator().manual_seed(1)).images
    b = ref.run(**args, generator=torch.Generator().manual_seed(1)).images
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert a.shape == (1, 4, 8, 8) and float(b.std()) > 0.1
