"""Habits users bring from diffusers: latents set the size, loading is quiet."""
import subprocess
import sys

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from lumen import engine


def test_latents_set_the_size_without_height_and_width(tiny_pipeline_dir):
    """diffusers samples given latents whatever their size; the image is 2x their size here."""
    latents = torch.randn(1, 4, 6, 10, generator=torch.Generator().manual_seed(0))
    eng = engine.build(str(tiny_pipeline_dir), device="cpu")
    kw = dict(prompt="a cat", latents=latents, num_inference_steps=4, output_type="np")
    ours = eng.run(**kw).images
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    theirs = pipe(**kw, guidance_rescale=0.7).images
    assert ours.shape == theirs.shape == (1, 12, 20, 3)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def load_output(model: str) -> tuple[str, str]:
    """(stdout, stderr) of a fresh interpreter that builds an engine for `model`."""
    code = f"from lumen import engine; engine.build({model!r}, device='cpu')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def test_loading_the_default_model_prints_nothing():
    assert load_output("default") == ("", "")


def test_loading_a_pipeline_folder_prints_no_notices(tiny_pipeline_dir):
    """No accelerate notice, no "steps_offset should be 1", no torchvision fallback note; only
    diffusers' own loading progress bars remain."""
    out, err = load_output(str(tiny_pipeline_dir))
    assert out == ""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and all(line.startswith(("Loading pipeline components", "Loading weights"))
                         for line in lines), err
