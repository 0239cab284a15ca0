"""Procedural data and tokenizer of the built-in models (engine/builtin/scenes.py, text.py)."""
import pytest
import torch

from lumen.engine.builtin import scenes
from lumen.engine.builtin.text import WordTokenizer
from lumen.engine.errors import InvalidInputError

REQUIRED_PROMPTS = ("a red circle", "a red circle on a solid black background",
                    "a red circle on a solid white background", "a blue square on a dark background",
                    "a blue square on a bright background", "solid black background",
                    "solid white background", "a white circle on a solid black background")


def _render(caption: str, n: int, seed: int = 0, size: int = scenes.IMAGE_SIZE) -> torch.Tensor:
    scene = next(s for s in scenes.all_scenes() if s.caption == caption)
    return scenes.render([scene] * n, torch.Generator().manual_seed(seed), size)


def test_required_prompts_are_captions():
    captions = {s.caption for s in scenes.all_scenes()}
    assert set(REQUIRED_PROMPTS) <= captions


def test_every_caption_tokenizes_within_max_length():
    tokenizer = WordTokenizer(scenes.vocabulary(), max_length=10)
    captions = [s.caption for s in scenes.all_scenes()]
    ids = tokenizer(captions)
    assert ids.shape == (len(captions), 10)
    assert (ids[:, 0] == 1).all()  # BOS
    assert int((ids > 1).sum(dim=1).max()) == 8  # the longest caption has 8 words


def test_images_are_rgb_in_range_and_deterministic_given_seed():
    x1, c1 = scenes.sample_batch(16, torch.Generator().manual_seed(3))
    x2, c2 = scenes.sample_batch(16, torch.Generator().manual_seed(3))
    x3, _ = scenes.sample_batch(16, torch.Generator().manual_seed(4))
    assert x1.shape == (16, 3, 32, 32) and x1.dtype == torch.float32
    assert float(x1.min()) >= -1.0 and float(x1.max()) <= 1.0
    assert c1 == c2 and torch.equal(x1, x2)
    assert not torch.equal(x1, x3)


def test_solid_backgrounds_are_exactly_minus_one_and_one():
    assert (_render("solid black background", 8) == -1).all()
    assert (_render("solid white background", 8) == 1).all()
    # With a shape, the background pixels (at least half the image) are exactly -1 / 1.
    on_black = _render("a red circle on a solid black background", 32)
    on_white = _render("a red circle on a solid white background", 32)
    assert ((on_black == -1).all(dim=1).float().mean(dim=(1, 2)) > 0.5).all()
    assert ((on_white == 1).all(dim=1).float().mean(dim=(1, 2)) > 0.5).all()


def test_unspecific_caption_brightness_is_half_dark_half_bright():
    b = scenes.caption_brightness("a red circle", n=2000, seed=0)
    dark, bright = (b < 0.4).float().mean(), (b > 0.55).float().mean()
    assert abs(float(dark) - 0.5) < 0.05 and abs(float(bright) - 0.5) < 0.05
    assert float(dark + bright) == 1.0  # no medium grey for a caption that names no background
    assert float(b.min()) < 0.1 and float(b.max()) > 0.9
    assert float(b.std()) > 0.3


def test_named_background_brightness_follows_the_name():
    assert float(scenes.caption_brightness("a blue square on a dark background", 500).max()) < 0.4
    assert float(scenes.caption_brightness("a blue square on a bright background", 500).min()) > 0.55
    assert float(scenes.caption_brightness("solid white background", 50).min()) == 1.0


def test_shapes_are_visible_against_their_background():
    x = _render("a white circle on a solid black background", 16)
    covered = (x > 0).all(dim=1).float().mean(dim=(1, 2))  # share of white pixels
    assert (covered > 0.05).all() and (covered < 0.5).all()
    hidden = [s for s in scenes.all_scenes() if s.color == "white" and s.background == "solid white"]
    assert hidden == []


def test_caption_brightness_glob_and_whole_data_set():
    circles = scenes.caption_brightness("a * circle on a solid black background", 200)
    everything = scenes.caption_brightness("", 2000)
    assert float(circles.max()) < 0.5
    assert float(everything.min()) == 0.0 and float(everything.max()) == 1.0


def test_caption_brightness_rejects_pattern_matching_nothing():
    with pytest.raises(InvalidInputError, match="a purple circle"):
        scenes.caption_brightness("a purple circle")


def test_tokenizer_rejects_unknown_word_and_lists_vocabulary():
    tokenizer = WordTokenizer(scenes.vocabulary(), max_length=10)
    with pytest.raises(ValueError) as info:
        tokenizer(["a purple circle"])
    assert isinstance(info.value, InvalidInputError)
    message = str(info.value)
    assert "'purple'" in message
    for word in scenes.vocabulary():
        assert word in message


def test_tokenizer_lowercases_and_pads_empty_prompt():
    tokenizer = WordTokenizer(scenes.vocabulary(), max_length=10)
    ids = tokenizer(["A Red  CIRCLE", "a red circle", ""])
    assert torch.equal(ids[0], ids[1])
    assert ids[2].tolist() == [1] + [0] * 9
    assert ids[1, 4:].tolist() == [0] * 6


def test_tokenizer_rejects_too_long_prompt_and_bare_string():
    tokenizer = WordTokenizer(scenes.vocabulary(), max_length=4)
    with pytest.raises(InvalidInputError, match="at most 3"):
        tokenizer(["a red circle on"])
    with pytest.raises(InvalidInputError, match="list of str"):
        tokenizer("a red circle")


def test_tokenizer_save_load_round_trip(tmp_path):
    tokenizer = WordTokenizer(scenes.vocabulary(), max_length=10)
    tokenizer.save_pretrained(tmp_path)
    loaded = WordTokenizer.from_pretrained(tmp_path)
    assert loaded.vocab == tokenizer.vocab and loaded.max_length == 10
