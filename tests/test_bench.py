"""`lumen bench` on CPU: rows, derived columns, skipped rows and the files it writes."""
import csv
import json
import subprocess
import sys

import pytest

from lumen.benchmarks import ablation
from lumen.benchmarks.presets import PRESETS, Preset
from lumen.cli import main

from conftest import TINY_UNET


def bench(tmp_path, *args):
    assert main(["bench", "--device", "cpu", "--iters", "1", "--out", str(tmp_path), *args]) == 0
    (path,) = tmp_path.glob("*.json")
    data = json.loads(path.read_text())
    return data["run"], {r["row"]: r for r in data["rows"]}, path


@pytest.mark.parametrize("name, count", [("sd15", 859_520_964), ("sd21", 865_910_724),
                                         ("sdxl", 2_567_463_684)])
def test_presets_have_the_published_parameter_counts(name, count):
    assert PRESETS[name].num_parameters() == count


def test_default_model_rows_on_cpu(tmp_path, capsys):
    # 4 divides T = 1000: diffusers' DDIM then reads the same previous timestep as the list
    # (with 3 steps its `t - T // S` arithmetic picks 333 where the trailing list has 332).
    run, rows, path = bench(tmp_path, "--steps", "4")
    assert run["model"] == "default" and run["steps"] == 4 and run["cfg"] is True
    assert run["parameters"] > 1_000_000 and run["unet_calls"] == 4
    for name in ("diffusers", "eager", "floor:eager"):
        r = rows[name]
        assert r["skipped"] is None and r["loop_ms"] > 0 and r["peak_mib"] > 0
        assert r["it_per_s"] == pytest.approx(4 / (r["loop_ms"] / 1e3))
        assert r["overhead"] == pytest.approx(r["loop_ms"] / rows["floor:eager"]["loop_ms"])
    # the baseline and Lumen's loop sample the same thing
    assert rows["diffusers"]["max_diff"] < 1e-4 and rows["eager"]["max_diff"] == 0
    # from_unet's zero output convs: the ControlNet row runs a ControlNet and adds zeros
    assert rows["controlnet"]["max_diff"] == 0 and rows["controlnet"]["loop_ms"] > 0
    for name in ("fused", "graph"):
        assert "needs CUDA" in rows[name]["skipped"]
    assert "name it in --rows" in rows["compiled"]["skipped"]
    assert "tensorrt" in rows["tensorrt"]["skipped"]
    with open(path.with_suffix(".csv")) as f:
        table = list(csv.DictReader(f))
    assert [r["row"] for r in table] == list(rows) and table[0]["model"] == "default"
    printed = capsys.readouterr().out
    assert "skipped: needs CUDA" in printed and "wrote" in printed


def test_batch_without_cfg_on_a_small_preset(tmp_path):
    run, rows, _ = bench(tmp_path, "--model", "small", "--height", "64", "--width", "64",
                         "--batch", "2", "--guidance", "1", "--steps", "2", "--rows", "eager")
    assert (run["cfg"], run["batch"], run["latent"]) == (False, 2, [4, 8, 8])
    assert rows["eager"]["ms_per_image"] == pytest.approx(rows["eager"]["loop_ms"] / 2)
    assert list(rows) == ["eager", "floor:eager"]


def test_sdxl_style_preset_feeds_added_conditioning(tmp_path, monkeypatch):
    tiny_xl = Preset("tiny_xl", dict(TINY_UNET, addition_embed_type="text_time",
                                     addition_time_embed_dim=8,
                                     projection_class_embeddings_input_dim=16 + 48),
                     vae_factor=8, seq_len=5, pooled_dim=16)
    monkeypatch.setitem(ablation.PRESETS, "tiny_xl", tiny_xl)
    run, rows, _ = bench(tmp_path, "--model", "tiny_xl", "--steps", "2", "--rows",
                         "diffusers", "eager")
    assert run["height"] == 64 and rows["diffusers"]["max_diff"] < 1e-4


def test_bad_bench_values_are_refused(tmp_path, capsys):
    assert main(["bench", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "steps=0" in capsys.readouterr().err


def test_python_m_benchmarks_runs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lumen.benchmarks", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--model" in done.stdout and "sd15" in done.stdout


def test_bench_subcommand_still_reaches_the_brightness_study():
    import argparse

    from lumen.benchmarks import brightness
    from lumen.benchmarks.cli import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    study = parser.parse_args(["bench", "brightness", "--n", "4"])
    loops = parser.parse_args(["bench", "--steps", "7"])
    assert (study.func, study.n) == (brightness.run, 4)
    assert (loops.func.__module__, loops.steps, loops.bench) == ("lumen.benchmarks.report", 7, None)


def test_brightness_split_by_noise_sign_stratifies_on_it():
    import torch

    from lumen.benchmarks.brightness import split_by_noise_sign

    # 6 of 8 seeds with a positive x_T mean; the image is bright exactly when the mean is positive,
    # except one negative seed that came out bright too.
    means = torch.tensor([0.2, 0.1, 0.3, 0.05, 0.4, 0.01, -0.2, -0.1])
    values = torch.tensor([0.9, 0.8, 0.95, 0.7, 0.9, 0.85, 0.1, 0.9])
    r = split_by_noise_sign(values, means)
    assert r["positive_share"] == 0.75
    assert (r["bright_if_pos"], r["dark_if_pos"], r["bright_if_neg"], r["dark_if_neg"]) == (1.0, 0.0, 0.5, 0.5)
    # plain fraction 7/8 bright; stratified (1 + 1/2) / 2
    assert (r["stratified_bright"], r["stratified_dark"]) == (0.75, 0.25)


def test_brightness_split_needs_both_signs():
    import torch

    from lumen.benchmarks.brightness import split_by_noise_sign
    from lumen.engine.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="3 seeds give x_T means of one sign only"):
        split_by_noise_sign(torch.tensor([0.1, 0.9, 0.5]), torch.tensor([0.1, 0.2, 0.3]))


def test_brightness_noise_means_are_the_engines_initial_noise():
    """The study's x_T of seed i is the one the engine draws: feeding it as latents reproduces the
    images the engine makes from generator seed i."""
    import torch

    from lumen import engine
    from lumen.benchmarks.brightness import noise_means

    eng = engine.build("default", device="cpu")
    shape = (3, 32, 32)
    x_T = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    kw = dict(prompt="a red circle", num_images_per_prompt=3, num_inference_steps=3, output_type="pt")
    seeded = eng.run(generator=[torch.Generator().manual_seed(i) for i in range(3)], **kw).images
    given = eng.run(latents=x_T, **kw).images
    torch.testing.assert_close(seeded, given, rtol=0, atol=0)
    torch.testing.assert_close(noise_means(3, shape), x_T.mean(dim=(1, 2, 3)), rtol=0, atol=0)


def test_brightness_study_of_one_prompt_group(tmp_path):
    import torch

    from lumen.benchmarks import brightness

    assert brightness.main(["--n", "4", "--steps", "2", "--prompt", "unspecific", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "brightness.json").read_text())
    assert list(data["results"]) == ["unspecific"]
    rows = data["results"]["unspecific"]
    assert len(rows) == 1 + len(brightness.SETUPS) and len(rows["training data"]["values"]) == 1000
    means = brightness.noise_means(4, (3, 32, 32))
    for setup in brightness.SETUPS:
        r = rows[setup.name]
        assert len(r["values"]) == 4 and r["by_noise_sign"]["positive_share"] == float((means > 0).float().mean())
        assert r["by_noise_sign"] == brightness.split_by_noise_sign(torch.tensor(r["values"]), means)
    table = (tmp_path / "brightness.md").read_text()
    assert "stratified bright" in table and "average gray" not in table
    assert (tmp_path / "brightness.png").stat().st_size > 0
    # --setup runs a subset of the rows, and each row's images do not depend on which others ran.
    one = tmp_path / "one"
    assert brightness.main(["--n", "4", "--steps", "2", "--prompt", "unspecific", "--setup", "default",
                            "--setup", "flawed", "--out", str(one)]) == 0
    subset = json.loads((one / "brightness.json").read_text())["results"]["unspecific"]
    assert list(subset) == ["training data", "flawed, leading DDIM", "default, trailing DDIM"]
    for name in list(subset)[1:]:
        assert subset[name]["values"] == rows[name]["values"]


def test_brightness_setup_must_be_known(capsys):
    from lumen.benchmarks import brightness

    with pytest.raises(SystemExit) as exit_info:
        brightness.main(["--setup", "default-typo"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'default-typo'" in capsys.readouterr().err


def test_bench_inpaint_keeps_the_unmasked_pixels_and_writes_its_report(tmp_path):
    """`lumen bench inpaint` at a tiny size: the study's own numbers, the files it writes."""
    import json

    from lumen.cli import main

    assert main(["bench", "inpaint", "--n", "2", "--steps", "4", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "inpaint.json").read_text())
    assert all(row["kept exactly"] == 1.0 for row in data["inpaint"].values())
    assert set(data["image_to_image"]) == {"0.25", "0.5", "0.75", "1.0"}
    assert data["image_to_image"]["0.25"] > data["image_to_image"]["1.0"]  # more of the white kept
    assert (tmp_path / "image_to_image.png").stat().st_size > 1000
    assert "| strength | border level |" in (tmp_path / "inpaint.md").read_text()
