"""The feature dict of TFDS `coco/2017`, shared by every dataset the pipelines read.

synthetic_shapes and the folder datasets of `coco_folder` are written with
these features, so one input pipeline reads them all as it reads COCO.
"""

from __future__ import annotations

import numpy as np

from focal_jax.data._tensorflow import tfds


def coco_2017_features(class_names, image_format: str | None = None) -> tfds.features.FeaturesDict:
  """The feature dict of TFDS `coco/2017`, with a `ClassLabel` of `class_names`.

  `image_format` ("png", "jpeg" or None: as given) is how images are stored.
  """
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(encoding_format=image_format),
      "image/filename": tfds.features.Text(),
      "image/id": np.int64,
      "objects": tfds.features.Sequence({
          "id": np.int64,
          "area": np.int64,
          "bbox": tfds.features.BBoxFeature(),
          "label": tfds.features.ClassLabel(names=class_names),
          "is_crowd": np.bool_,
      }),
  })
