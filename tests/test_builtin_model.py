"""The shipped models load offline and draw what the prompt says (real assertions on real weights)."""
import PIL.Image
import pytest
import torch

from lumen import engine
from lumen.engine.errors import InvalidInputError


@pytest.fixture(scope="module")
def default():
    return engine.build("default", device="cpu")


def test_default_model_loads_offline_with_its_training_facts(default):
    assert default.config.zero_terminal_snr and default.config.prediction_type == "v_prediction"
    assert default.config.timestep_spacing == "trailing"
    assert default.components.vae is None and default.components.vae_scale_factor == 1
    flawed = engine.build("flawed", device="cpu").config
    assert not flawed.zero_terminal_snr and flawed.prediction_type == "epsilon"


def test_default_model_generates_the_right_shapes_and_dtypes(default):
    out = default.run(prompt=["a red circle", "solid white background"], num_inference_steps=2,
                      generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 2 and all(isinstance(im, PIL.Image.Image) and im.size == (32, 32) for im in out.images)
    arr = default.run(prompt="a red circle", num_inference_steps=2, output_type="np").images
    assert arr.shape == (1, 32, 32, 3) and arr.dtype.name == "float32"
    lat = default.run(prompt="a red circle", num_inference_steps=2, output_type="latent").images
    assert lat.shape == (1, 3, 32, 32) and lat.dtype == torch.float32


def test_black_background_prompt_is_darker_than_white(default):
    def brightness(prompt):
        images = default.run(prompt=prompt, num_images_per_prompt=4, num_inference_steps=10,
                             generator=[torch.Generator().manual_seed(i) for i in range(4)], output_type="pt").images
        return images.mean(dim=(1, 2, 3))
    black, white = brightness("solid black background"), brightness("solid white background")
    assert float(black.max()) < 0.25 and float(white.min()) > 0.75, (black, white)


def test_unknown_words_are_refused_with_the_vocabulary(default):
    with pytest.raises(InvalidInputError, match="purple") as info:
        default.run(prompt="a purple circle", num_inference_steps=1)
    assert "circle" in str(info.value) and "background" in str(info.value)
