"""The `lumen` command line."""
import PIL.Image
import pytest

from lumen.benchmarks.brightness import bin_fractions
from lumen.cli import main


def test_generate_from_a_local_folder_writes_numbered_pngs(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code = main(["generate", "a cat", "--model", str(tiny_pipeline_dir), "-o", str(out), "--steps", "2",
                 "--num-images", "2", "--upscale", "2", "--sampler", "dpmpp_2m"])
    assert code == 0
    for i in range(2):
        with PIL.Image.open(tmp_path / f"cat-{i}.png") as image:
            assert image.size == (32, 32)  # 16x16 upscaled twice
    assert "dpmpp_2m, trailing spacing, 2 steps" in capsys.readouterr().out


def test_generate_reports_bad_input_as_an_error_line(tiny_pipeline_dir, tmp_path, capsys):
    code = main(["generate", "a cat", "--model", str(tiny_pipeline_dir), "-o", str(tmp_path / "x.png"),
                 "--steps", "0"])
    assert code == 2
    assert "num_inference_steps=0" in capsys.readouterr().err


def test_generate_refuses_a_missing_model_folder(tmp_path, capsys):
    assert main(["generate", "a cat", "--model", str(tmp_path / "nope")]) == 2
    assert "never downloads" in capsys.readouterr().err


def test_brightness_bins_split_at_thirds():
    import torch

    fractions = bin_fractions(torch.tensor([0.0, 0.2, 0.5, 0.5, 0.9, 1.0, 0.34, 0.66]))
    assert fractions == pytest.approx({"dark": 0.25, "medium": 0.5, "bright": 0.25})


def test_generate_from_an_image_keeps_some_of_it_at_half_strength(tmp_path, capsys):
    """The README's image-to-image command on the built-in model: a white input shows through
    the black background at strength 0.5, and not at all at 1.0."""
    white = tmp_path / "white.png"
    PIL.Image.new("RGB", (32, 32), (255, 255, 255)).save(white)
    prompt = "a red circle on a solid black background"
    means = {}
    for strength in ("0.5", "1.0"):
        out = tmp_path / f"s{strength}.png"
        assert main(["generate", prompt, "--image", str(white), "--strength", strength,
                     "-o", str(out)]) == 0
        with PIL.Image.open(out) as image:
            corner = image.crop((0, 0, 6, 6)).convert("L")  # background, away from the shape
            means[strength] = sum(corner.getdata()) / 36
    assert means["0.5"] > 100 > 50 > means["1.0"]  # grey-white kept vs the prompt's black
    assert "12 of 25 steps (strength 0.5)" in capsys.readouterr().out
    assert main(["generate", prompt, "--image", str(tmp_path / "none.png")]) == 2
    assert "--image" in capsys.readouterr().err


def test_generate_with_a_mask_inpaints_only_the_white_region(tmp_path):
    grey = tmp_path / "grey.png"
    PIL.Image.new("RGB", (32, 32), (128, 128, 128)).save(grey)
    mask = PIL.Image.new("L", (32, 32), 0)
    mask.paste(255, (16, 0, 32, 32))
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["generate", "a red circle on a solid black background", "--image", str(grey),
                 "--mask", str(tmp_path / "mask.png"), "--strength", "1", "-o", str(out)]) == 0
    with PIL.Image.open(out) as image:
        kept = image.crop((0, 0, 16, 32)).convert("L")
        assert set(kept.getdata()) == {128}  # the black half of the mask: the input, exactly
        painted = image.crop((16, 0, 32, 32)).convert("L")
        assert sum(painted.getdata()) / (16 * 32) < 100  # the prompt's black background
