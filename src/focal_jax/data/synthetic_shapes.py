"""`synthetic_shapes`: an embedded TFDS detection dataset with the features of `coco/2017`.

Images of 4 shape classes (rectangle, ellipse, triangle, cross) of random colour
and size (10-90 px in 128x128 by default, so that P3-P5 all get objects), partly
hiding each other, on low-frequency colour noise with a texture, 0-4 objects per
image (about 20% of the images are empty negatives), and about 8% of the images
with one crowd region (`is_crowd=True`: a cluster of tiny shapes of one class
under one box). See `shapes_render` for the exact invariants.

The feature dict is exactly the one of `coco/2017` (`image`, `image/filename`,
`image/id`, `objects{id, area, bbox, label, is_crowd}`; `label` is a
`ClassLabel` with 80 names, of which the first 4 are the shapes and the rest
are unused), so one input pipeline reads both. Images are stored as PNG
(lossless; the tensor spec is the same uint8 [H, W, 3] as COCO's JPEGs).

Deterministic: image `i` of a split is rendered from
`numpy.random.default_rng([seed, split_code, i])`, so two builds with one seed
write the same examples in the same order (in two processes the bytes of a
record can differ: protobuf may write its feature map's entries in another
order). Built fully offline, stored as tfrecord:

    python -m focal_jax.data.synthetic_shapes --data_dir /tmp/tfds
    # or in Python
    builder = tfds.builder("synthetic_shapes", data_dir=...)   # after importing this module
    builder.download_and_prepare(file_format="tfrecord")

Configs: `default` (6000 train / 500 validation, 128x128), `tiny` (32 / 16, for
tests), `coco_like` (640x480 JPEG, up to 20 objects of 10-400 px, 200 / 50: a
COCO-sized stand-in for input benchmarks).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import struct
import time
import zlib

import numpy as np

from focal_jax.data import shapes_render
from focal_jax.data._tensorflow import tf, tfds
from focal_jax.data.features import coco_2017_features
from focal_jax.data.shapes_render import SHAPE_NAMES, RenderConfig

NUM_TFDS_LABELS = 80  # as coco/2017
LABEL_NAMES = SHAPE_NAMES + tuple(f"unused_{i:02d}" for i in range(len(SHAPE_NAMES), NUM_TFDS_LABELS))
SPLIT_CODES = {"train": 1, "validation": 2}
# Image ids are `SPLIT_CODES[split] * IMAGE_ID_STRIDE + i + 1` (unique across splits);
# annotation ids are `image_id * ANNOTATION_ID_STRIDE + k + 1`.
IMAGE_ID_STRIDE = 10_000_000
ANNOTATION_ID_STRIDE = 1000


@dataclasses.dataclass(eq=False)
class SyntheticShapesConfig(tfds.core.BuilderConfig):
  """Split sizes, seed and look of one synthetic build."""

  num_train: int = 6000
  num_validation: int = 500
  seed: int = 0
  render: RenderConfig = dataclasses.field(default_factory=RenderConfig)
  image_format: str = "png"  # "png" (lossless) or "jpeg" (as COCO)


_DEFAULT = SyntheticShapesConfig(name="default", description="6000/500 images of 128x128.")
_TINY = SyntheticShapesConfig(name="tiny", num_train=32, num_validation=16,
                              description="32/16 images of 128x128, for tests.")
_COCO_LIKE = SyntheticShapesConfig(
    name="coco_like", num_train=200, num_validation=50, image_format="jpeg",
    render=RenderConfig(height=480, width=640, max_objects=20, min_size=10, max_size=400,
                        crowd_probability=0.2),
    description="200/50 JPEG images of 640x480 with up to 20 objects (input benchmarks).")


def render_split_example(config: SyntheticShapesConfig, split: str, index: int):
  """Image `index` of `split`: (uint8 image, objects) exactly as stored by the builder."""
  rng = np.random.default_rng([config.seed, SPLIT_CODES[split], index])
  return shapes_render.render_image(rng, config.render)


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes (filter "Up" on every row, zlib level 1).

  A lossless PNG that is cheaper to write than TensorFlow's encoder makes it:
  encoding is most of the work of building the dataset.
  """
  h, w, _ = image.shape
  rows = image.reshape(h, w * 3)
  filtered = rows.copy()
  filtered[1:] -= rows[:-1]  # uint8 wrap-around is the PNG "Up" filter
  raw = np.concatenate([np.full((h, 1), 2, np.uint8), filtered], axis=1).tobytes()

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 1))
          + chunk(b"IEND", b""))


def _encode(image: np.ndarray, image_format: str) -> bytes:
  if image_format == "png":
    return encode_png(image)
  return tf.io.encode_jpeg(image, quality=92).numpy()


# Rendering holds the GIL for part of each image and zlib's compression releases it, so a
# few threads render and encode faster than one; more than a few only contend for the GIL.
_RENDER_THREADS = min(4, os.cpu_count() or 1)
_RENDER_CHUNK = 256  # images rendered ahead at most


def _rendered_and_encoded(config: SyntheticShapesConfig, split: str, num_examples: int):
  """`(encoded image, objects)` of images `0 .. num_examples - 1` of `split`, in order.

  Rendered on `_RENDER_THREADS` threads: each image depends only on its own
  index, so the output is the same as one thread's.
  """

  def render(index):
    image, objects = render_split_example(config, split, index)
    return _encode(image, config.image_format), objects

  with concurrent.futures.ThreadPoolExecutor(_RENDER_THREADS, thread_name_prefix="render") as pool:
    for start in range(0, num_examples, _RENDER_CHUNK):
      yield from pool.map(render, range(start, min(start + _RENDER_CHUNK, num_examples)))


# Run as `python -m focal_jax.data.synthetic_shapes`, this file is `__main__`: that copy of
# the class stays out of the TFDS registry so that importing the package module later
# (which registers "synthetic_shapes") does not collide with it.
class SyntheticShapes(tfds.core.GeneratorBasedBuilder,
                      skip_registration=__name__ == "__main__"):
  """Synthetic shapes detection dataset with the `coco/2017` features."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [_DEFAULT, _TINY, _COCO_LIKE]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[1],
        features=coco_2017_features(LABEL_NAMES, self.builder_config.image_format),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    return {
        "train": self._generate_examples("train", cfg.num_train),
        "validation": self._generate_examples("validation", cfg.num_validation),
    }

  def _generate_examples(self, split: str, num_examples: int):
    cfg = self.builder_config
    h, w = cfg.render.height, cfg.render.width
    for i, (encoded, objects) in enumerate(_rendered_and_encoded(cfg, split, num_examples)):
      image_id = SPLIT_CODES[split] * IMAGE_ID_STRIDE + i + 1
      ext = "png" if cfg.image_format == "png" else "jpg"
      filename = f"{split}_{i:06d}.{ext}"
      yield filename, {
          "image": io.BytesIO(encoded),
          "image/filename": filename,
          "image/id": image_id,
          "objects": [{
              "id": image_id * ANNOTATION_ID_STRIDE + k + 1,
              "area": o["area"],
              "bbox": tfds.features.BBox(ymin=o["box"][1] / h, xmin=o["box"][0] / w,
                                         ymax=o["box"][3] / h, xmax=o["box"][2] / w),
              "label": o["label"],
              "is_crowd": o["is_crowd"],
          } for k, o in enumerate(objects)],
      }


def prepare(data_dir: str | None = None, config: str | SyntheticShapesConfig = "default",
            *, verbose: bool = True) -> SyntheticShapes:
  """Builds the dataset into `data_dir` unless already there; returns the builder."""
  builder = SyntheticShapes(data_dir=data_dir, config=config)
  if not builder.is_prepared():
    if verbose:
      print(f"Building synthetic_shapes/{builder.builder_config.name} into {builder.data_dir} ...",
            flush=True)
    start = time.perf_counter()
    tfds.display_progress_bar(False)  # our own two lines say what happens
    builder.download_and_prepare(
        file_format="tfrecord",
        download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP),
    )
    if verbose:
      splits = {k: v.num_examples for k, v in builder.info.splits.items()}
      print(f"Built synthetic_shapes/{builder.builder_config.name} {splits} in "
            f"{time.perf_counter() - start:.1f} s at {builder.data_dir}", flush=True)
  return builder


def main(argv=None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
      prog="python -m focal_jax.data.synthetic_shapes",
      description="Build the synthetic_shapes TFDS dataset (offline, tfrecord).")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--config", default="default",
                      choices=[c.name for c in SyntheticShapes.BUILDER_CONFIGS])
  args = parser.parse_args(argv)
  builder = SyntheticShapes(data_dir=args.data_dir, config=args.config)
  if builder.is_prepared():
    print(f"Already prepared at {builder.data_dir}")
    return
  prepare(args.data_dir, args.config)


if __name__ == "__main__":
  main()
