"""Reads back what engine/builtin/scenes.py draws: background level, shape colour, kind, count.

Deterministic and built from the renderer's own definitions, so that a generated image can be
scored against its prompt exactly (the adherence benchmark):
- background: the median colour of the border pixels, its grey level matched against the
  caption's range in `scenes.BACKGROUNDS` (+- BACKGROUND_MARGIN: half the gap between ranges);
- shapes: 8-connected components of pixels at least MIN_CONTRAST from the background colour,
  counted when at least MIN_AREA pixels;
- colour: the nearest `scenes.COLORS` entry to the median of the largest component's core;
- kind: the largest component's soft coverage (alpha), its fill of the bounding box and the
  share of it in the box's upper half, matched to the renderer's circle, square and upward
  triangle (fill pi/4, 1, 1/2; upper share 1/2, 1/2, 1/4);
- location: the largest component's centroid (x, y) in the renderer's pixel coordinates.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lumen.engine.builtin import scenes
from lumen.engine.errors import InvalidInputError

ATTRIBUTES = ("background", "color", "kind", "one shape")
BACKGROUND_MARGIN = 0.05  # dark ends at 0.3, gray starts at 0.4
MIN_CONTRAST = 0.2  # the least contrast the data has is 0.4 (black shape on gray 0.4)
MIN_AREA = 6  # pixels; the smallest shape drawn (a triangle of r = 5.1 px) covers ~34
# (fill of the bounding box, share of the area in its upper half) of each kind drawn
KIND_FEATURES = {"circle": (math.pi / 4, 0.5), "square": (1.0, 0.5), "triangle": (0.5, 0.25)}
assert set(KIND_FEATURES) == set(scenes.SHAPES)


@dataclass(frozen=True)
class Reading:
    """What the analyzer sees in one image."""

    level: float  # background grey level in [0, 1]
    count: int  # shapes of at least MIN_AREA pixels
    color: str | None  # of the largest shape; None when there is none
    kind: str | None
    x: float | None = None  # the largest shape's centroid in pixels (the renderer's coordinates)
    y: float | None = None


def components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected component labels [B, H, W] of a bool mask [B, H, W]; 0 off the mask."""
    B, H, W = mask.shape
    index = torch.arange(1, H * W + 1, dtype=torch.float32).view(1, H, W).expand(B, H, W)
    labels = torch.where(mask, index, 0.0)
    while True:  # each component takes its largest index, spreading one pixel per pass
        grown = F.max_pool2d(labels[:, None], 3, 1, 1)[:, 0] * mask
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def nearest_color(rgb: torch.Tensor) -> str:
    """Name of the scenes.COLORS entry nearest (Euclidean) to rgb [3]."""
    names = list(scenes.COLORS)
    table = torch.tensor([scenes.COLORS[n] for n in names])
    return names[int((table - rgb).norm(dim=1).argmin())]


def shape_kind(alpha: torch.Tensor) -> str:
    """Kind whose KIND_FEATURES are nearest to those of a coverage map alpha [H, W] in [0, 1]."""
    rows, cols = alpha.amax(dim=1), alpha.amax(dim=0)
    height, width = float(rows.sum()), float(cols.sum())  # soft extents: exact for a box
    area = float(alpha.sum())
    top = int((rows > 0.5).nonzero()[0]) if bool((rows > 0.5).any()) else int(rows.argmax())
    middle = top + height / 2
    y = torch.arange(alpha.shape[0], dtype=torch.float32) + 0.5
    upper = float((alpha.sum(dim=1) * (middle - y).clamp(0, 1)).sum())
    features = (area / max(height * width, 1e-6), upper / max(area, 1e-6))
    return min(KIND_FEATURES, key=lambda k: math.dist(KIND_FEATURES[k], features))


def read_one(image: torch.Tensor, labels: torch.Tensor, background: torch.Tensor,
             distance: torch.Tensor) -> Reading:
    """image: [3, H, W] in [0, 1]; labels, distance: [H, W]; background: [3]."""
    level = float(background.mean())
    ids, areas = labels[labels > 0].unique(return_counts=True)
    keep = areas >= MIN_AREA
    if not bool(keep.any()):
        return Reading(level, 0, None, None)
    largest = labels == ids[keep][areas[keep].argmax()]
    core = largest & (distance >= 0.5 * distance[largest].max())
    color = image[:, core].median(dim=1).values
    # soft coverage along the shape colour - background axis, near the component only
    near = F.max_pool2d(largest[None, None].float(), 3, 1, 1)[0, 0] > 0
    axis = color - background
    alpha = ((image - background.view(3, 1, 1)) * axis.view(3, 1, 1)).sum(0) / axis.dot(axis)
    alpha = alpha.clamp(0, 1) * near
    ys, xs = largest.nonzero(as_tuple=True)
    return Reading(level, int(keep.sum()), nearest_color(color), shape_kind(alpha),
                   float(xs.float().mean()) + 0.5, float(ys.float().mean()) + 0.5)


def read_scenes(images: torch.Tensor) -> list[Reading]:
    """One Reading per image of images [B, 3, H, W] in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise InvalidInputError(f"images of shape {tuple(images.shape)}; expected [B, 3, H, W]")
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, 1:-1, 0],
                        images[:, :, 1:-1, -1]], dim=2)  # [B, 3, 2H + 2W - 4]
    background = border.median(dim=2).values  # [B, 3]
    distance = (images - background[:, :, None, None]).abs().amax(dim=1)  # [B, H, W]
    labels = components(distance >= MIN_CONTRAST)
    return [read_one(images[i], labels[i], background[i], distance[i]) for i in range(len(images))]


def background_ok(level: float, scene: scenes.Scene) -> bool:
    """Whether a grey level lies in one of the ranges the scene's caption allows."""
    ranges = [scenes.BACKGROUNDS[b] for b in scene.background_choices()]
    return any(lo - BACKGROUND_MARGIN <= level <= hi + BACKGROUND_MARGIN for lo, hi in ranges)


def score(reading: Reading, scene: scenes.Scene) -> dict[str, bool]:
    """Per attribute: does the image show what the scene's caption says."""
    return {"background": background_ok(reading.level, scene),
            "color": reading.color == scene.color,
            "kind": reading.kind == scene.shape,
            "one shape": reading.count == (0 if scene.shape is None else 1)}


def inside(reading: Reading, mask: torch.Tensor) -> bool:
    """Whether the reading's shape centroid lies on a mask [H, W] (coverage >= 0.5)."""
    if reading.x is None:
        return False
    col, row = int(reading.x), int(reading.y)  # pixel i spans [i, i + 1)
    return bool(mask[min(row, mask.shape[0] - 1), min(col, mask.shape[1] - 1)] >= 0.5)


def validate_location(n: int = 1000, seed: int = 0) -> float:
    """Share of n rendered shape scenes whose read centroid lies on the shape's own mask."""
    g = torch.Generator().manual_seed(seed)
    drawn = [s for s in scenes.sample_scenes(2 * n, g) if s.shape is not None][:n]
    images, masks = scenes.render(drawn, g, masks=True)
    readings = read_scenes((images + 1) / 2)
    return sum(inside(r, m[0]) for r, m in zip(readings, masks)) / len(drawn)


def validate(n: int = 1000, seed: int = 0) -> dict[str, float]:
    """Accuracy per attribute on n rendered training scenes (colour and kind: those with a shape)."""
    g = torch.Generator().manual_seed(seed)
    drawn = scenes.sample_scenes(n, g)
    readings = read_scenes((scenes.render(drawn, g) + 1) / 2)
    hits = {a: [] for a in ATTRIBUTES}
    for scene, reading in zip(drawn, readings):
        for attribute, ok in score(reading, scene).items():
            if scene.shape is not None or attribute in ("background", "one shape"):
                hits[attribute].append(ok)
    return {a: sum(h) / len(h) for a, h in hits.items()}
