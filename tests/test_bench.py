"""`lumen bench` on CPU: rows, derived columns, skipped rows and the files it writes."""
import csv
import json
import subprocess
import sys

import pytest

from benchmarks import ablation
from benchmarks.presets import PRESETS, Preset
from engine.cli import main

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
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--model" in done.stdout and "sd15" in done.stdout


def test_bench_subcommand_still_reaches_the_brightness_study():
    import argparse

    from benchmarks import brightness
    from benchmarks.cli import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    study = parser.parse_args(["bench", "brightness", "--n", "4"])
    loops = parser.parse_args(["bench", "--steps", "7"])
    assert (study.func, study.n) == (brightness.run, 4)
    assert (loops.func.__module__, loops.steps, loops.bench) == ("benchmarks.report", 7, None)
