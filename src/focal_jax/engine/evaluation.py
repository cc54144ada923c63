"""COCO evaluation with pycocotools, on the host.

Detections arrive as fixed-size arrays in original-image pixels; they become
COCO results (`[x, y, w, h]`, real category ids) and `COCOeval` gives the 12
standard numbers.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np

from focal_jax._extras import require

COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def detections_to_coco(boxes, scores, classes, valid, image_ids, category_ids) -> list[dict]:
  """COCO result dicts of a batch of detections.

  Args:
    boxes: `[B, D, 4]` xyxy boxes in original-image pixels.
    scores, classes, valid: `[B, D]`.
    image_ids: `[B]` image ids; examples with a negative id (padding) are skipped.
    category_ids: the COCO category id of each contiguous class.
  """
  scores, classes, valid = map(np.asarray, (scores, classes, valid))
  bboxes = coco_bboxes(boxes)
  category_ids = np.asarray(category_ids)
  results = []
  for b, image_id in enumerate(np.asarray(image_ids)):
    if image_id < 0:
      continue
    for bbox, score, cls in zip(bboxes[b][valid[b]], scores[b][valid[b]], classes[b][valid[b]]):
      results.append({"image_id": int(image_id), "category_id": int(category_ids[cls]),
                      "bbox": bbox.tolist(), "score": float(score)})
  return results


def coco_bboxes(boxes) -> np.ndarray:
  """xyxy boxes `[..., 4]` -> COCO's `[x, y, w, h]`, as float64 NumPy on the host.

  The host counterpart of `focal_jax.ops.boxes.xyxy_to_xywh` for results
  files: no device round trip, and widths and heights are differences of the
  float64 corners (what `float(x2) - float(x1)` gives).
  """
  boxes = np.asarray(boxes, np.float64)
  return np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def coco_evaluate(ground_truth: dict, results: list[dict]) -> dict[str, float]:
  """Runs `COCOeval` (bbox) and returns the 12 standard numbers by name.

  A number is -1 where the ground truth has nothing to measure (e.g. APl when
  no object is large); an empty result list scores 0 everywhere.
  """
  COCO = require("pycocotools.coco").COCO  # pylint: disable=invalid-name
  COCOeval = require("pycocotools.cocoeval").COCOeval  # pylint: disable=invalid-name

  if not results:
    return dict.fromkeys(COCO_METRIC_NAMES, 0.0)  # pycocotools cannot load an empty list
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(ground_truth)
    coco_gt.dataset.setdefault("info", {})
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(results)
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return {name: float(value) for name, value in zip(COCO_METRIC_NAMES, evaluator.stats)}


def format_table(metrics: dict[str, float]) -> str:
  """The 12 COCO numbers as a two-row text table ("n/a" for -1)."""
  names = [n for n in COCO_METRIC_NAMES if n in metrics]
  header = " | ".join(f"{n:>6}" for n in names)
  values = " | ".join(f"{metrics[n]:6.3f}" if metrics[n] >= 0 else f"{'n/a':>6}" for n in names)
  return f"{header}\n{'-' * len(header)}\n{values}"
