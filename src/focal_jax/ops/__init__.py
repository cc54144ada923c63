"""Pure JAX ops on arrays: boxes, box coding, anchors, matching, losses, NMS, post-processing.

Every function here is jit, vmap and grad friendly, with static shapes
(padding and masks, never Python loops over boxes). Boxes are float32
`(x1, y1, x2, y2)` in absolute pixels of the network input.

| module | paper concept |
| --- | --- |
| `boxes` | box formats, areas, IoU and GIoU |
| `box_coder` | the R-CNN box parameterization (deltas <-> boxes) |
| `anchors` | the anchors of every pyramid level |
| `matching` | anchor-to-ground-truth assignment (foreground / background / ignored) |
| `losses` | the sigmoid focal loss, box losses and the RetinaNet loss |
| `nms` | greedy (class-aware) non-maximum suppression |
| `postprocess` | per-level top-k, decoding and NMS into fixed-size detections |
"""
