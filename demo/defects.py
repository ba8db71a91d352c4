"""Synthetic industrial surface images with optional defects, for the demo classifier.

Every image is a textured surface (brushed metal, cast metal or painted plastic) under
uneven lighting, with at most one kind of defect drawn on it. All randomness comes from
the caller's ``numpy.random.Generator``, so a fixed seed gives the same images.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

LABELS: tuple[str, ...] = ("ok", "scratch", "crack", "stain", "pit")

Image = np.ndarray  # float32 HxWx3, BGR, roughly 0..255


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise, rescaled to zero mean and unit std (HxW float32)."""
    noise: np.ndarray = rng.standard_normal((size, size)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _streaks(rng: np.random.Generator, size: int, length: int, angle: float) -> np.ndarray:
    """White noise smeared along ``angle`` (radians): the grain of brushed metal."""
    kernel = np.zeros((length, length), np.float32)
    c = (length - 1) / 2.0
    dx, dy = np.cos(angle) * c, np.sin(angle) * c
    cv2.line(kernel, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1.0, 1)
    kernel /= kernel.sum()
    noise = rng.standard_normal((size, size)).astype(np.float32)
    streaks = cv2.filter2D(noise, -1, kernel, borderType=cv2.BORDER_REFLECT)
    return (streaks - streaks.mean()) / (streaks.std() + 1e-6)


def _grey_tint(rng: np.random.Generator) -> np.ndarray:
    """A near-neutral BGR multiplier, like steel or aluminium under different lamps."""
    return (1.0 + rng.uniform(-0.06, 0.06, 3)).astype(np.float32)


def _brushed_metal(rng: np.random.Generator, size: int) -> Image:
    """Grey surface with fine directional grain at a random orientation."""
    base = rng.uniform(95, 190)
    grain = _streaks(rng, size, int(rng.integers(15, 45)), rng.uniform(0, np.pi))
    tone = base + rng.uniform(6, 14) * grain + rng.uniform(2, 6) * _smooth_noise(rng, size, 20)
    return tone[..., None] * _grey_tint(rng)


def _cast_metal(rng: np.random.Generator, size: int) -> Image:
    """Darker, rough grey surface with multi-scale mottling and grain."""
    base = rng.uniform(70, 160)
    tone = (
        base
        + rng.uniform(5, 12) * _smooth_noise(rng, size, rng.uniform(10, 25))
        + rng.uniform(4, 9) * _smooth_noise(rng, size, rng.uniform(2, 4))
        + rng.uniform(5, 10) * _smooth_noise(rng, size, 0.7)
    )
    return tone[..., None] * _grey_tint(rng)


def _painted(rng: np.random.Generator, size: int) -> Image:
    """Coloured painted or moulded-plastic surface with soft orange-peel noise."""
    hsv = np.array([[[rng.integers(0, 180), rng.integers(30, 160), rng.integers(90, 220)]]], np.uint8)
    colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)
    tone = (
        1.0
        + rng.uniform(0.02, 0.05) * _smooth_noise(rng, size, rng.uniform(3, 6))
        + rng.uniform(0.01, 0.03) * _smooth_noise(rng, size, 0.8)
    )
    return tone[..., None] * colour


SURFACES: tuple[Callable[[np.random.Generator, int], Image], ...] = (
    _brushed_metal,
    _cast_metal,
    _painted,
)


def _contrast(rng: np.random.Generator, low: float, high: float) -> float:
    """A defect strength; about one in four is drawn from the faint end of the range."""
    if rng.random() < 0.25:
        return float(rng.uniform(low, low + 0.3 * (high - low)))
    return float(rng.uniform(low, high))


def _point(rng: np.random.Generator, size: int, margin: float) -> np.ndarray:
    """A random position at least ``margin`` pixels from the border."""
    return rng.uniform(margin, size - margin, 2)


def _to_px(points: np.ndarray) -> np.ndarray:
    """Float points to the fixed-point int32 polyline format (4 fractional bits)."""
    return np.round(points * 16).astype(np.int32).reshape(-1, 1, 2)


def _draw_polyline(mask: np.ndarray, points: np.ndarray, width: int) -> None:
    """Anti-aliased open polyline onto a float mask, in place."""
    cv2.polylines(mask, [_to_px(points)], False, 1.0, width, cv2.LINE_AA, shift=4)


def _scratch(rng: np.random.Generator, img: Image) -> Image:
    """One to three thin straight or gently curved lines, brighter or darker than the surface."""
    size = img.shape[0]
    mask: np.ndarray = np.zeros(img.shape[:2], np.float32)
    for _ in range(int(rng.integers(1, 4))):
        start = _point(rng, size, 20)
        angle = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(40, 170)
        end = np.clip(start + length * np.array([np.cos(angle), np.sin(angle)]), 5, size - 5)
        normal = np.array([-np.sin(angle), np.cos(angle)])
        bend = (start + end) / 2 + normal * rng.uniform(-0.12, 0.12) * length
        t = np.linspace(0, 1, 40)[:, None]
        curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end
        _draw_polyline(mask, curve, int(rng.integers(1, 3)))
    mask = cv2.GaussianBlur(mask, (0, 0), 0.6)
    sign = 1.0 if rng.random() < 0.6 else -1.0
    return img + sign * _contrast(rng, 22, 70) * mask[..., None]


def _crack_walk(
    rng: np.random.Generator, mask: np.ndarray, start: np.ndarray, angle: float, steps: int, depth: int
) -> None:
    """Jagged random walk drawn into ``mask`` that may fork into thinner side branches."""
    size = mask.shape[0]
    points = [start]
    for _ in range(steps):
        angle += rng.normal(0, 0.35)
        step = rng.uniform(3, 8) * np.array([np.cos(angle), np.sin(angle)])
        points.append(np.clip(points[-1] + step, 2, size - 2))
        if depth < 2 and rng.random() < 0.08:
            fork = angle + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
            _crack_walk(rng, mask, points[-1], fork, steps // 2, depth + 1)
    _draw_polyline(mask, np.array(points), max(1, 2 - depth))


def _crack(rng: np.random.Generator, img: Image) -> Image:
    """One or two dark, branching, jagged fissures."""
    size = img.shape[0]
    mask: np.ndarray = np.zeros(img.shape[:2], np.float32)
    for _ in range(int(rng.integers(1, 3))):
        start = _point(rng, size, 40)
        _crack_walk(rng, mask, start, rng.uniform(0, 2 * np.pi), int(rng.integers(10, 28)), 0)
    mask = np.clip(cv2.GaussianBlur(mask, (0, 0), 0.5), 0, 1)
    return img * (1.0 - _contrast(rng, 0.25, 0.7) * mask[..., None])


def _stain(rng: np.random.Generator, img: Image) -> Image:
    """One or two soft, irregular blobs that darken and discolour the surface."""
    size = img.shape[0]
    mask: np.ndarray = np.zeros(img.shape[:2], np.float32)
    for _ in range(int(rng.integers(1, 3))):
        centre = _point(rng, size, 40)
        radius = rng.uniform(14, 45)
        for _ in range(int(rng.integers(3, 7))):
            offset = rng.normal(0, radius * 0.45, 2)
            axes = (radius * rng.uniform(0.35, 0.8), radius * rng.uniform(0.35, 0.8))
            box = (tuple(centre + offset), (2 * axes[0], 2 * axes[1]), rng.uniform(0, 180))
            cv2.ellipse(mask, box, 1.0, -1, cv2.LINE_AA)
    edge = rng.uniform(3, 9)
    mask = cv2.GaussianBlur(mask, (0, 0), edge) * (1 + 0.25 * _smooth_noise(rng, size, 4))
    mask = np.clip(mask, 0, 1)
    tint = np.array([rng.uniform(0.6, 1.0), rng.uniform(0.3, 0.8), rng.uniform(0.0, 0.5)], np.float32)
    return img * (1.0 - _contrast(rng, 0.2, 0.55) * mask[..., None] * tint)


def _pit(rng: np.random.Generator, img: Image) -> Image:
    """One to five small dark round craters, each with a bright rim highlight on one side."""
    size = img.shape[0]
    dark: np.ndarray = np.zeros(img.shape[:2], np.float32)
    light: np.ndarray = np.zeros(img.shape[:2], np.float32)
    light_angle = rng.uniform(0, 2 * np.pi)
    light_dir = np.array([np.cos(light_angle), np.sin(light_angle)])
    for _ in range(int(rng.integers(1, 6))):
        centre = _point(rng, size, 12)
        radius = rng.uniform(2.5, 7)
        cv2.circle(dark, _to_px(centre)[0, 0], round(radius * 16), 1.0, -1, cv2.LINE_AA, 4)
        rim = centre + light_dir * radius * 0.9
        cv2.circle(light, _to_px(rim)[0, 0], round(radius * 0.45 * 16), 1.0, -1, cv2.LINE_AA, 4)
    dark = cv2.GaussianBlur(dark, (0, 0), 1.0)
    light = cv2.GaussianBlur(light, (0, 0), 1.0) * (1 - dark)
    strength = _contrast(rng, 0.3, 0.8)
    return img * (1.0 - strength * dark[..., None]) + strength * 70 * light[..., None]


DEFECTS: dict[str, Callable[[np.random.Generator, Image], Image]] = {
    "scratch": _scratch,
    "crack": _crack,
    "stain": _stain,
    "pit": _pit,
}


def _lighting(rng: np.random.Generator, size: int) -> np.ndarray:
    """Multiplicative illumination: a linear gradient at a random angle plus a soft hot spot."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(0, 0.5) * (np.cos(angle) * xx + np.sin(angle) * yy)
    spot_x, spot_y = rng.uniform(-0.5, 0.5, 2)
    spot = rng.uniform(0, 0.25) * np.exp(-((xx - spot_x) ** 2 + (yy - spot_y) ** 2) / 0.15)
    return (rng.uniform(0.8, 1.15) + gradient + spot).astype(np.float32)


def generate(label: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Render one ``size`` x ``size`` surface with a ``label`` defect ("ok": none); BGR uint8."""
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; expected one of {LABELS}")
    surface = SURFACES[int(rng.integers(len(SURFACES)))]
    img = surface(rng, size)
    if label != "ok":
        img = DEFECTS[label](rng, img)
    img = img * _lighting(rng, size)[..., None]
    blur = rng.uniform(0, 1.3)
    if blur > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), blur)
    img = img + rng.normal(0, rng.uniform(1, 4), img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)
