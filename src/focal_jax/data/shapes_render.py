"""NumPy renderer of the synthetic shapes detection images (no TensorFlow here).

One image is a pure function of a `numpy.random.Generator` and a `RenderConfig`:
a low-frequency colour-noise background with a texture (grating or blotches),
a few shapes of 4 classes (rectangle, ellipse, triangle, cross) of random colour
and size, drawn in sequence so that later shapes may partly hide earlier ones,
sometimes a "crowd" (a cluster of tiny shapes of one class under one box), and
mild per-pixel noise over everything.

Invariants (each object of the returned list):
- `box` is the tight pixel box `(x1, y1, x2, y2)` of the *whole* shape (pixel
  edges: the shape covers pixel columns x1..x2-1), also where a later shape
  hides part of it;
- at least `min_visible` of every object's pixels stay visible (a candidate
  shape that would hide more of an earlier object is re-drawn elsewhere);
- the shape's colour differs from the (noise-free) background and from the
  overlapping shapes under its pixels and a 1-pixel ring around them by at
  least `min_contrast` in some channel, so its outline is really visible;
- `area` is the number of pixels of the whole shape (the crowd: of all its
  tiny shapes);
- shapes never leave the image.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SHAPE_NAMES = ("rectangle", "ellipse", "triangle", "cross")


@dataclasses.dataclass(frozen=True)
class RenderConfig:
  """How the images of one synthetic split look."""

  height: int = 128
  width: int = 128
  max_objects: int = 4  # number of objects is uniform in 0..max_objects
  min_size: float = 10.0  # object side lengths in pixels (log-uniform scale)
  max_size: float = 90.0
  max_aspect: float = 1.6  # width/height within [1/max_aspect, max_aspect]
  min_visible: float = 0.5  # fraction of each object that must stay visible
  min_contrast: int = 48  # colour distance to what lies under and around
  crowd_probability: float = 0.08  # images that get one crowd region
  pixel_noise: int = 6  # uniform integer noise in [-n, n] on every pixel
  placement_tries: int = 20


def _bilinear_upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
  """Upsamples a [gh, gw, C] grid to [height, width, C] with bilinear weights."""

  def weights(n_out, n_in):
    pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    w = np.zeros((n_out, n_in))
    w[np.arange(n_out), lo] += 1 - frac
    w[np.arange(n_out), hi] += frac
    return w

  wy = weights(height, grid.shape[0])
  wx = weights(width, grid.shape[1])
  rows = (wy @ grid.reshape(grid.shape[0], -1)).reshape(height, grid.shape[1], -1)
  return np.matmul(rows.transpose(0, 2, 1), wx.T).transpose(0, 2, 1)


def render_background(rng: np.random.Generator, cfg: RenderConfig) -> np.ndarray:
  """Low-frequency colour noise plus a texture, float [H, W, 3] in 0..255."""
  h, w = cfg.height, cfg.width
  gh, gw = rng.integers(2, 6, size=2)
  grid = rng.uniform(0, 255, size=(gh, gw, 3))
  bg = _bilinear_upsample(grid, h, w)
  kind = rng.integers(3)
  if kind == 0:  # a sinusoidal grating
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    theta = rng.uniform(0, np.pi)
    freq = rng.uniform(0.05, 0.35)  # cycles per pixel
    phase = rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(8, 30)
    wave = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
    bg = bg + amp * wave[..., None] * rng.uniform(0.5, 1.0, size=3)
  elif kind == 1:  # mid-frequency blotches
    blotch = rng.normal(0, 1, size=(h // 8, w // 8, 3))
    bg = bg + rng.uniform(10, 30) * _bilinear_upsample(blotch, h, w)
  return np.clip(bg, 0, 255)


def shape_mask(label: int, x0: float, y0: float, w: float, h: float, height: int,
               width: int, rng: np.random.Generator) -> np.ndarray:
  """Boolean [height, width] mask of shape `label` inside the box (x0, y0, w, h).

  A pixel belongs to the shape when its centre does.
  """
  mask = np.zeros((height, width), bool)
  # Only the pixels whose centres can lie in the box are computed.
  r0, r1 = max(int(np.floor(y0)) - 1, 0), min(int(np.ceil(y0 + h)) + 1, height)
  c0, c1 = max(int(np.floor(x0)) - 1, 0), min(int(np.ceil(x0 + w)) + 1, width)
  cy = (np.arange(r0, r1) + 0.5)[:, None]
  cx = (np.arange(c0, c1) + 0.5)[None, :]
  inside = (cx >= x0) & (cx <= x0 + w) & (cy >= y0) & (cy <= y0 + h)
  name = SHAPE_NAMES[label]
  if name == "rectangle":
    local = inside
  elif name == "ellipse":
    rx, ry = w / 2, h / 2
    local = ((cx - x0 - rx) / rx) ** 2 + ((cy - y0 - ry) / ry) ** 2 <= 1.0
  elif name == "triangle":
    # Apex on one side of the box (at a random place along it), base on the
    # opposite side: the triangle touches all four sides of its box.
    t = rng.uniform(0.15, 0.85)
    side = rng.integers(4)
    x1, y1 = x0 + w, y0 + h
    if side == 0:  # apex at the top
      pts = [(x0 + t * w, y0), (x1, y1), (x0, y1)]
    elif side == 1:  # apex at the bottom
      pts = [(x0 + t * w, y1), (x0, y0), (x1, y0)]
    elif side == 2:  # apex on the left
      pts = [(x0, y0 + t * h), (x1, y1), (x1, y0)]
    else:  # apex on the right
      pts = [(x1, y0 + t * h), (x0, y0), (x0, y1)]
    (ax, ay), (bx, by), (qx, qy) = pts
    d1 = (cx - bx) * (ay - by) - (ax - bx) * (cy - by)
    d2 = (cx - qx) * (by - qy) - (bx - qx) * (cy - qy)
    d3 = (cx - ax) * (qy - ay) - (qx - ax) * (cy - ay)
    neg = (d1 < 0) | (d2 < 0) | (d3 < 0)
    pos = (d1 > 0) | (d2 > 0) | (d3 > 0)
    local = ~(neg & pos) & inside
  elif name == "cross":
    tw = max(3.0, w * rng.uniform(0.25, 0.4))
    th = max(3.0, h * rng.uniform(0.25, 0.4))
    vertical = np.abs(cx - (x0 + w / 2)) <= tw / 2
    horizontal = np.abs(cy - (y0 + h / 2)) <= th / 2
    local = inside & (vertical | horizontal)
  else:
    raise ValueError(f"unknown shape label {label}")
  mask[r0:r1, c0:c1] = local
  return mask


def _dilate(mask: np.ndarray) -> np.ndarray:
  out = mask.copy()
  out[1:] |= mask[:-1]
  out[:-1] |= mask[1:]
  out[:, 1:] |= mask[:, :-1]
  out[:, :-1] |= mask[:, 1:]
  return out


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
  rows = np.flatnonzero(mask.any(axis=1))
  cols = np.flatnonzero(mask.any(axis=0))
  return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _pick_colour(rng, under: np.ndarray, min_contrast: int, tries: int = 12):
  """A colour at least `min_contrast` away (max over channels) from all of `under` [N, 3]."""
  best, best_d = None, -1.0
  for _ in range(tries):
    c = rng.integers(0, 256, size=3)
    d = np.abs(under - c).max(axis=-1).min() if len(under) else 255.0
    if d >= min_contrast:
      return c, True
    if d > best_d:
      best, best_d = c, d
  return best, False


def render_image(rng: np.random.Generator, cfg: RenderConfig = RenderConfig()):
  """Renders one image.

  Returns:
    image: uint8 [H, W, 3].
    objects: list of dicts with `label` (int), `box` (x1, y1, x2, y2) ints in
      pixels, `area` (int), `is_crowd` (bool), `colour` (uint8 [3]; for a crowd,
      that of its first tiny shape), in drawing order.
  """
  h, w = cfg.height, cfg.width
  bg = render_background(rng, cfg)
  canvas = bg.copy()  # noise-free colours drawn so far
  owner = np.full((h, w), -1, np.int64)  # index of the object seen at each pixel
  objects = []
  full_masks = []

  if rng.uniform() < cfg.crowd_probability:
    label = int(rng.integers(len(SHAPE_NAMES)))
    side = rng.uniform(28, 56)
    rx0 = rng.uniform(0, w - side)
    ry0 = rng.uniform(0, h - side)
    union = np.zeros((h, w), bool)
    colour0 = None
    for _ in range(int(rng.integers(6, 13))):
      s = rng.uniform(5, 9)
      sx = rx0 + rng.uniform(0, side - s)
      sy = ry0 + rng.uniform(0, side - s)
      m = shape_mask(label, sx, sy, s, s, h, w, rng)
      if not m.any():
        continue
      c, _ = _pick_colour(rng, canvas[_dilate(m)], cfg.min_contrast)
      canvas[m] = c
      union |= m
      colour0 = c if colour0 is None else colour0
    if union.any():
      owner[union] = 0
      objects.append(dict(label=label, box=_tight_box(union), area=int(union.sum()),
                          is_crowd=True, colour=np.asarray(colour0, np.uint8)))
      full_masks.append(union)

  n = int(rng.integers(0, cfg.max_objects + 1))
  log_lo, log_hi = np.log(cfg.min_size), np.log(cfg.max_size)
  for _ in range(n):
    for _ in range(cfg.placement_tries):
      label = int(rng.integers(len(SHAPE_NAMES)))
      scale = np.exp(rng.uniform(log_lo, log_hi))
      aspect = np.exp(rng.uniform(-np.log(cfg.max_aspect), np.log(cfg.max_aspect)))
      bw = min(max(scale * aspect ** 0.5, cfg.min_size), cfg.max_size, w)
      bh = min(max(scale / aspect ** 0.5, cfg.min_size), cfg.max_size, h)
      x0 = rng.uniform(0, w - bw)
      y0 = rng.uniform(0, h - bh)
      m = shape_mask(label, x0, y0, bw, bh, h, w, rng)
      if m.sum() < 16:
        continue
      # Keep every earlier (non-crowd) object mostly visible.
      ok = True
      for j, o in enumerate(objects):
        if o["is_crowd"]:
          continue
        visible_after = np.count_nonzero((owner == j) & ~m)
        if visible_after < cfg.min_visible * o["area"]:
          ok = False
          break
      if not ok:
        continue
      c, ok = _pick_colour(rng, canvas[_dilate(m)], cfg.min_contrast)
      if not ok:
        continue
      canvas[m] = c
      owner[m] = len(objects)
      objects.append(dict(label=label, box=_tight_box(m), area=int(m.sum()),
                          is_crowd=False, colour=np.asarray(c, np.uint8)))
      full_masks.append(m)
      break

  noise = rng.integers(-cfg.pixel_noise, cfg.pixel_noise + 1, size=(h, w, 3), dtype=np.int16)
  image = np.clip(np.rint(canvas).astype(np.int16) + noise, 0, 255).astype(np.uint8)
  return image, objects
