"""Procedural training data of the built-in model: coloured shapes on grey-level backgrounds.

Every image is a uniform background of grey level L in [0, 1] with at most one anti-aliased
shape on it; pixels are returned in [-1, 1] (x = 2*img - 1). Captions come from a fixed
vocabulary. A caption that names no background ("a red circle") gets a background drawn half
from the dark end and half from the bright end (never medium grey), so its data brightness is
bimodal and spread wide: that is what the brightness study measures a sampler against.
"""
import fnmatch
from dataclasses import dataclass

import torch

from ..errors import InvalidInputError

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLORS = {  # RGB in [0, 1]
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
}
# Named background -> (low, high) grey level; low == high is a solid level.
BACKGROUNDS = {
    "solid black": (0.0, 0.0),
    "solid white": (1.0, 1.0),
    "black": (0.0, 0.08),
    "white": (0.92, 1.0),
    "dark": (0.0, 0.3),
    "bright": (0.7, 1.0),
    "gray": (0.4, 0.6),
}
# Backgrounds of a caption that names none: equal mass on each; half dark, half bright.
UNSPECIFIED = ("solid black", "dark", "solid white", "bright")
DARK = ("solid black", "black", "dark")
BRIGHT = ("solid white", "white", "bright")
# Shapes that would vanish on a background: never generated together.
_HIDDEN = {"black": DARK, "white": BRIGHT}
BACKGROUND_ONLY = 0.1  # share of background-only images ("solid black background", ...)


@dataclass(frozen=True)
class Scene:
    """One caption's recipe: shape and colour (None for a background-only image) and background."""

    shape: str | None
    color: str | None
    background: str | None  # a key of BACKGROUNDS, or None for an unspecific caption

    @property
    def caption(self) -> str:
        if self.shape is None:
            return f"{self.background} background"
        thing = f"a {self.color} {self.shape}"
        return thing if self.background is None else f"{thing} on a {self.background} background"

    def background_choices(self) -> tuple[str, ...]:
        """Backgrounds this scene's images are drawn from (uniformly)."""
        choices = UNSPECIFIED if self.background is None else (self.background,)
        return tuple(b for b in choices if b not in _HIDDEN.get(self.color, ()))


def all_scenes() -> tuple[Scene, ...]:
    """Every caption of the data set, in a fixed order; sampling is uniform over this list."""
    scenes = [Scene(None, None, b) for b in BACKGROUNDS]
    for color in COLORS:
        for shape in SHAPES:
            for background in (None, *BACKGROUNDS):
                scene = Scene(shape, color, background)
                if scene.background_choices():
                    scenes.append(scene)
    return tuple(scenes)


def scene_of(caption: str) -> Scene:
    """The scene whose caption this is."""
    for scene in all_scenes():
        if scene.caption == caption:
            return scene
    raise InvalidInputError(f"caption={caption!r} is no caption of the data set; captions look like "
                            f"{all_scenes()[len(all_scenes()) // 2].caption!r}")


def scene_weights(scenes: tuple[Scene, ...]) -> torch.Tensor:
    """Sampling weights [N]: background-only scenes share BACKGROUND_ONLY, shape scenes the rest."""
    bg_only = torch.tensor([s.shape is None for s in scenes])
    n_bg = int(bg_only.sum())
    w = torch.full((len(scenes),), (1 - BACKGROUND_ONLY) / max(len(scenes) - n_bg, 1))
    return torch.where(bg_only, BACKGROUND_ONLY / max(n_bg, 1), w)


def vocabulary() -> tuple[str, ...]:
    """Every word of every caption, sorted."""
    return tuple(sorted({w for s in all_scenes() for w in s.caption.split()}))


def _shape_masks(shape_ids: torch.Tensor, cx, cy, r, size: int) -> torch.Tensor:
    """Anti-aliased coverage [B, 1, size, size] in [0, 1] from a signed distance (pixels)."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = coords.view(1, size, 1), coords.view(1, 1, size)
    dx, dy = x - cx.view(-1, 1, 1), y - cy.view(-1, 1, 1)
    r = r.view(-1, 1, 1)
    circle = (dx**2 + dy**2).sqrt() - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.85 * r
    # Upward equilateral triangle inscribed in radius r: three half-planes.
    k = 3**0.5 / 2
    triangle = torch.maximum(torch.maximum(k * dx - 0.5 * dy, -k * dx - 0.5 * dy), dy) - 0.5 * r
    dist = torch.stack([circle, square, triangle], dim=1)  # [B, 3, H, W]
    chosen = dist.gather(1, shape_ids.view(-1, 1, 1, 1).expand(-1, 1, size, size))
    return (0.5 - chosen).clamp(0, 1)


def render(scenes: list[Scene], generator: torch.Generator, size: int = IMAGE_SIZE,
           masks: bool = False):
    """Images [B, 3, size, size] in [-1, 1], one per scene, drawn with `generator`; with
    masks=True also each shape's coverage [B, 1, size, size] in [0, 1] (zero without a shape),
    from the same draws."""
    B = len(scenes)
    u = torch.rand(B, 6, generator=generator)  # background pick, level, radius, cx, cy, jitter
    levels = torch.empty(B)
    for i, scene in enumerate(scenes):
        choices = scene.background_choices()
        lo, hi = BACKGROUNDS[choices[min(int(u[i, 0] * len(choices)), len(choices) - 1)]]
        levels[i] = lo + (hi - lo) * u[i, 1]
    r = size * (0.16 + 0.14 * u[:, 2])
    cx = r + (size - 2 * r) * u[:, 3]
    cy = r + (size - 2 * r) * u[:, 4]
    has_shape = torch.tensor([s.shape is not None for s in scenes])
    shape_ids = torch.tensor([SHAPES.index(s.shape) if s.shape else 0 for s in scenes])
    mask = _shape_masks(shape_ids, cx, cy, r, size) * has_shape.view(-1, 1, 1, 1)
    color = torch.tensor([COLORS[s.color] if s.color else (0.0, 0.0, 0.0) for s in scenes])
    # Colour jitter of +-0.05 keeps colours apart; black and white stay exact.
    jitter = (u[:, 5:6] - 0.5) * 0.1 * ~torch.tensor([s.color in ("black", "white") for s in scenes]).view(-1, 1)
    color = (color + jitter).clamp(0, 1).view(B, 3, 1, 1)
    img = levels.view(B, 1, 1, 1) * (1 - mask) + color * mask
    return (img * 2 - 1, mask) if masks else img * 2 - 1


def sample_scenes(n: int, generator: torch.Generator) -> list[Scene]:
    """n scenes drawn with replacement by scene_weights: the training data's caption mix."""
    scenes = all_scenes()
    idx = torch.multinomial(scene_weights(scenes), n, replacement=True, generator=generator)
    return [scenes[i] for i in idx.tolist()]


def sample_batch(batch_size: int, generator: torch.Generator,
                 size: int = IMAGE_SIZE) -> tuple[torch.Tensor, list[str]]:
    """(images [B, 3, size, size] in [-1, 1], captions) with captions drawn by scene_weights."""
    chosen = sample_scenes(batch_size, generator)
    return render(chosen, generator, size), [s.caption for s in chosen]


def brightness(images: torch.Tensor) -> torch.Tensor:
    """Per-image mean grey level in [0, 1] of images [B, 3, H, W] in [-1, 1]."""
    return ((images + 1) / 2).mean(dim=(1, 2, 3))


def caption_brightness(pattern: str, n: int = 1000, seed: int = 0,
                       size: int = IMAGE_SIZE) -> torch.Tensor:
    """Data's per-image mean brightness [n] for captions matching a glob pattern.

    The captions matching `pattern` (fnmatch, e.g. "a red circle" or "a * circle") are drawn
    with their training weights; "" or "*" gives the whole data set (what the unconditional
    prompt is trained on).
    """
    scenes = all_scenes()
    matching = [s for s in scenes if pattern in ("", "*") or fnmatch.fnmatchcase(s.caption, pattern)]
    if not matching:
        raise InvalidInputError(f"caption pattern {pattern!r} matches no caption; captions look "
                                f"like {scenes[len(scenes) // 2].caption!r}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(scene_weights(scenes)[[scenes.index(s) for s in matching]], n,
                            replacement=True, generator=g)
    return brightness(render([matching[i] for i in idx.tolist()], g, size))
