"""The ground truth of a split as a COCO json dict, for pycocotools evaluation."""

from __future__ import annotations

import numpy as np

from focal_jax.data._tensorflow import tf
from focal_jax.data.builders import SKIP_IMAGE_DECODING, as_dataset, get_builder, read_config
from focal_jax.data.config import InputConfig


def coco_ground_truth(config: InputConfig, split: str | None = None) -> dict[str, list]:
  """The ground truth of a split as a COCO json dict (pycocotools-ready).

  `{"images": [{id, height, width, file_name}], "annotations": [{id, image_id,
  category_id, bbox (x, y, w, h in original pixels), area, iscrowd}],
  "categories": [{id, name}]}` with category ids from `config.labels`. Works for
  coco/2017, synthetic_shapes and folder datasets (read from the TFDS records).
  Labels that map to no class and boxes of zero area (after clipping to the
  image) are left out.
  """
  split = split or config.eval_split
  builder = get_builder(config)
  ds = as_dataset(builder, config.dataset, split, shuffle_files=False,
                   decoders=SKIP_IMAGE_DECODING, read_config=read_config())

  def image_size(example):
    image = example["image"]
    if image.dtype == tf.string:
      shape = tf.cond(tf.io.is_jpeg(image), lambda: tf.image.extract_jpeg_shape(image)[:2],
                      lambda: tf.shape(tf.io.decode_image(image, channels=3,
                                                          expand_animations=False))[:2])
    else:
      shape = tf.shape(image)[:2]
    return {"size": tf.cast(shape, tf.int32), "image/id": example["image/id"],
            "image/filename": example["image/filename"], "objects": example["objects"]}

  ds = ds.map(image_size, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  labels = config.labels
  images, annotations, seen_ids = [], [], set()
  for ex in ds.as_numpy_iterator():
    h, w = (int(v) for v in ex["size"])
    image_id = int(ex["image/id"])
    name = ex["image/filename"]
    images.append({"id": image_id, "height": h, "width": w,
                   "file_name": name.decode() if isinstance(name, bytes) else str(name)})
    obj = ex["objects"]
    n = min(len(obj["bbox"]), len(obj["label"]), len(obj["is_crowd"]), len(obj["area"]),
            len(obj["id"]))
    for k in range(n):
      label = int(obj["label"][k])
      if not 0 <= label < len(labels.label_to_class) or labels.label_to_class[label] < 0:
        continue
      ymin, xmin, ymax, xmax = np.clip(obj["bbox"][k].astype(np.float64), 0.0, 1.0)
      x, y, bw, bh = xmin * w, ymin * h, (xmax - xmin) * w, (ymax - ymin) * h
      if bw <= 0 or bh <= 0:
        continue
      ann_id = int(obj["id"][k])
      if ann_id <= 0 or ann_id in seen_ids:  # pycocotools needs unique positive ids
        ann_id = max(seen_ids, default=0) + 1
      seen_ids.add(ann_id)
      annotations.append({
          "id": ann_id, "image_id": image_id,
          "category_id": int(labels.category_ids[labels.label_to_class[label]]),
          "bbox": [float(x), float(y), float(bw), float(bh)],
          "area": float(obj["area"][k]) if obj["area"][k] > 0 else float(bw * bh),
          "iscrowd": int(bool(obj["is_crowd"][k])),
      })
  return {"images": images, "annotations": annotations, "categories": labels.coco_categories()}
