"""Adherence benchmark: the scene analyzer reads rendered scenes, the scorer, `lumen bench adherence`."""
import json

import pytest
import torch
from PIL import Image

from lumen.benchmarks import adherence, scene_analyzer
from lumen.benchmarks.scene_analyzer import Reading, read_scenes, score
from lumen.engine.builtin import scenes
from lumen.cli import main

RED_CIRCLE = scenes.Scene("circle", "red", "dark")


def _render(scene: scenes.Scene, n: int = 4, seed: int = 0, size: int = scenes.IMAGE_SIZE):
    """n images [n, 3, size, size] in [0, 1] of one scene."""
    return (scenes.render([scene] * n, torch.Generator().manual_seed(seed), size) + 1) / 2


def _wrong(scores: list[dict]) -> set[str]:
    return {a for s in scores for a, ok in s.items() if not ok}


def test_analyzer_reads_rendered_training_scenes():
    accuracy = scene_analyzer.validate(n=300, seed=1)
    assert set(accuracy) == set(scene_analyzer.ATTRIBUTES)
    assert min(accuracy.values()) >= 0.98, accuracy


def test_reading_of_a_solid_background_and_of_one_shape():
    (empty,) = read_scenes(_render(scenes.Scene(None, None, "solid white"), n=1))
    assert empty == Reading(level=1.0, count=0, color=None, kind=None)
    readings = read_scenes(_render(scenes.Scene("triangle", "yellow", "solid black"), n=8))
    assert {(r.level, r.count, r.color, r.kind) for r in readings} == {(0.0, 1, "yellow", "triangle")}


@pytest.mark.parametrize("drawn, differs", [
    (scenes.Scene("circle", "green", "dark"), {"color"}),
    (scenes.Scene("square", "red", "dark"), {"kind"}),
    (scenes.Scene("circle", "red", "bright"), {"background"}),
    (scenes.Scene("triangle", "blue", "solid white"), {"background", "color", "kind"}),
])
def test_scorer_flags_exactly_the_attributes_that_differ(drawn, differs):
    scores = [score(r, RED_CIRCLE) for r in read_scenes(_render(drawn, n=8))]
    assert _wrong(scores) == differs
    assert all(not s[a] for s in scores for a in differs)  # wrong on every image, not some


def test_scorer_flags_two_shapes_as_not_one():
    # two red circles drawn in 14-pixel tiles, two columns apart, on a solid black canvas
    tiles = _render(scenes.Scene("circle", "red", "solid black"), n=2, seed=3, size=14)
    image = torch.zeros(1, 3, 32, 32)
    image[0, :, 9:23, 1:15], image[0, :, 9:23, 17:31] = tiles[0], tiles[1]
    (reading,) = read_scenes(image)
    assert reading.count == 2
    assert _wrong([score(reading, scenes.Scene("circle", "red", "solid black"))]) == {"one shape"}


def test_prompts_are_shape_captions_and_none_is_held_out():
    assert len(adherence.PROMPTS) == 12
    assert {adherence.prompt_scene(p).shape for p in adherence.PROMPTS} == set(scenes.SHAPES)
    assert {adherence.prompt_scene(p).color for p in adherence.PROMPTS} == set(scenes.COLORS)
    assert adherence.held_out(adherence.PROMPTS) == []  # the data draws every caption


def test_bench_adherence_writes_consistent_json_markdown_and_png(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(adherence, "VALIDATION_SCENES", 100)
    prompts = ["a red circle", "a black square on a solid white background"]
    assert main(["bench", "adherence", "--model", "default", "--n", "2", "--steps", "2",
                 "--prompts", *prompts, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "adherence.json").read_text())
    assert (data["n"], data["steps"], data["prompts"]) == (2, 2, prompts)
    assert data["validation"]["scenes"] == 100 and data["validation"]["not judged"] == []
    assert list(data["results"]) == ["default, trailing DDIM", "default, trailing DDIM, rescale 0.7"]
    table = (tmp_path / "adherence.md").read_text()
    for name, result in data["results"].items():
        for prompt, r in result["prompts"].items():
            assert len(r["readings"]) == 2
            wrong = [set() for _ in range(2)]
            for i, reading in enumerate(r["readings"]):
                wrong[i] = _wrong([score(Reading(**reading), adherence.prompt_scene(prompt))])
            assert r["all correct"] == sum(not w for w in wrong) / 2
            for attribute in scene_analyzer.ATTRIBUTES:
                assert r[attribute] == sum(attribute not in w for w in wrong) / 2
        mean = sum(r["all correct"] for r in result["prompts"].values()) / len(prompts)
        assert result["overall"]["all correct"] == pytest.approx(mean)
        cells = " | ".join(f"{v:.2f}" for v in result["overall"].values())
        assert f"| {name} | {cells} |" in table
    assert table in capsys.readouterr().out
    with Image.open(tmp_path / "adherence.png") as grid:
        assert grid.height == 14 + len(prompts) * (32 * adherence.GRID_UPSCALE + 2)


@pytest.mark.parametrize("args, message", [(["--n", "0"], "n=0"), (["--steps", "0"], "steps=0"),
                                           (["--model", "both2"], "model='both2'"),
                                           (["--prompts", "a purple circle"], "'a purple circle'"),
                                           (["--prompts", "solid black background"], "with a shape")])
def test_bad_adherence_values_are_refused(args, message, tmp_path, capsys):
    assert main(["bench", "adherence", *args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_attribute_judged_below_the_bar_is_named_and_left_out_of_all_correct(monkeypatch):
    accuracy = {"background": 1.0, "color": 0.9, "kind": 0.99, "one shape": 0.98}
    monkeypatch.setattr(scene_analyzer, "validate", lambda n, seed: accuracy)
    check = adherence.validation()
    assert (check["judged"], check["not judged"]) == (["background", "kind", "one shape"], ["color"])
    green = _render(scenes.Scene("circle", "green", "dark"), n=2)
    scores = adherence.score_images(green, RED_CIRCLE, check["judged"])
    assert (scores["color"], scores["all correct"]) == (0.0, 1.0)
    data = {"n": 2, "steps": 2, "guidance": 7.5, "prompts": [RED_CIRCLE.caption], "held out": [],
            "validation": check, "results": {"a setup": {"overall": adherence.overall(
                {RED_CIRCLE.caption: scores}), "prompts": {RED_CIRCLE.caption: scores}}}}
    assert "not judged (below 0.98): color" in adherence.markdown(data)
