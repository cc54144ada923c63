"""Independent float64 references shared by the tests, written from the definitions."""


def iou(a, b) -> float:
  """IoU of two xyxy boxes, with Python floats; 0 when the union is empty."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def greedy_nms(boxes, scores, threshold, classes=None) -> list[int]:
  """Plain-Python greedy NMS: by score (ties by index), drop overlaps > threshold (per class)."""
  order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
  kept = []
  for i in order:
    if all(iou(boxes[i], boxes[k]) <= threshold or (classes is not None and classes[i] != classes[k])
           for k in kept):
      kept.append(i)
  return kept
