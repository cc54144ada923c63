import math

import numpy as np
import pytest

from focal_jax import AnchorConfig, feature_sizes, generate_anchors


def test_anchor_counts_of_the_paper_sizes():
  assert generate_anchors((512, 512)).shape == (49104, 4)
  assert generate_anchors((640, 640)).shape == (76725, 4)
  # Odd size: ceil(100 / 2**l) x ceil(132 / 2**l) for l = 3..7.
  expected = sum(math.ceil(100 / 2**l) * math.ceil(132 / 2**l) for l in range(3, 8)) * 9
  assert generate_anchors((100, 132)).shape == (expected, 4)
  assert feature_sizes((100, 132), AnchorConfig()) == [(13, 17), (7, 9), (4, 5), (2, 3), (1, 2)]


def test_tiny_map_written_out():
  # One level (stride 8, size 16), one ratio, two scales, on a 16x16 input: a 2x2 map.
  config = AnchorConfig(min_level=3, max_level=3, sizes=(16,), scales=(1.0, 2.0), aspect_ratios=(1.0,))
  anchors = generate_anchors((16, 16), config)
  expected = []
  for y in (0, 8):
    for x in (0, 8):
      for half in (8, 16):
        expected.append([x - half, y - half, x + half, y + half])
  np.testing.assert_array_equal(anchors, np.array(expected, np.float32))


def test_centre_offset_half_cell():
  config = AnchorConfig(min_level=3, max_level=3, sizes=(8,), scales=(1.0,), aspect_ratios=(1.0,), offset=0.5)
  anchors = generate_anchors((16, 8), config)
  np.testing.assert_array_equal(anchors, [[0, 0, 8, 8], [0, 8, 8, 16]])


def test_ratio_major_order_and_shapes():
  anchors = generate_anchors((128, 128))[:9]
  widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
  ratios = np.repeat([0.5, 1.0, 2.0], 3)
  sizes = np.tile([32 * 2 ** (i / 3) for i in range(3)], 3)
  np.testing.assert_allclose(heights / widths, ratios, rtol=1e-5)
  np.testing.assert_allclose(np.sqrt(widths * heights), sizes, rtol=1e-5)
  np.testing.assert_allclose((anchors[:, 0] + anchors[:, 2]) / 2, 0.0, atol=1e-5)


def test_torchvision_preset_written_out():
  # torchvision: sizes (32, int(32 * 2**(1/3)), int(32 * 2**(2/3))) = (32, 40, 50), ratios h/w 0.5, 1, 2,
  # base anchors [-w/2, -h/2, w/2, h/2] with w = size / sqrt(r), h = size * sqrt(r), rounded.
  anchors = generate_anchors((64, 64), AnchorConfig.torchvision())
  expected = []
  for r in (0.5, 1.0, 2.0):
    for s in (32, 40, 50):
      w, h = s / math.sqrt(r), s * math.sqrt(r)
      expected.append([round(-w / 2), round(-h / 2), round(w / 2), round(h / 2)])
  np.testing.assert_array_equal(anchors[:9], expected)
  # Second location of P3 is shifted by the stride (8) in x.
  np.testing.assert_array_equal(anchors[9:18], np.array(expected) + [8, 0, 8, 0])


def test_torchvision_strides_on_sizes_not_divisible():
  # torchvision uses image_size // feature_size as the stride: 100 // 13 = 7 on P3.
  anchors = generate_anchors((100, 100), AnchorConfig.torchvision())
  assert anchors[9, 0] - anchors[0, 0] == 7


@pytest.mark.parametrize("kwargs", [
    dict(sizes=(32, 64)),
    dict(scales=(1.0, float("nan"))),
    dict(aspect_ratios=(0.0,)),
    dict(offset=1.5),
    dict(min_level=5, max_level=4),
    dict(sizes=(32, 64, 128, float("inf"), 512)),
])
def test_bad_config_raises(kwargs):
  with pytest.raises(ValueError):
    AnchorConfig(**kwargs)


def test_bad_image_size_raises():
  with pytest.raises(ValueError, match="image_size"):
    generate_anchors((0, 64))
  with pytest.raises(ValueError, match="image_size"):
    generate_anchors((64,))
