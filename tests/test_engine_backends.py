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


def test_backend_options_are_refused_for_torch(tiny_unet):
    with pytest.raises(engine.InvalidInputError, match="backend_options"):
        engine.build(tiny_unet, backend_options={"cache_dir": "/tmp"})
