"""focal_jax: RetinaNet and the sigmoid focal loss, written the JAX way.

The ops are pure JAX functions (jit, vmap and grad friendly) on xyxy boxes in
absolute pixels; see the module docstrings for the conventions.
"""

from focal_jax.ops.anchors import AnchorConfig, feature_sizes, generate_anchors
from focal_jax.ops.box_coder import decode_boxes, encode_boxes
from focal_jax.ops.boxes import (
    box_area,
    box_iou,
    cxcywh_to_xyxy,
    elementwise_generalized_box_iou,
    generalized_box_iou,
    intersection_union,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)
from focal_jax.convert import from_torchvision
from focal_jax.ops.losses import focal_loss, giou_loss, l1_loss, retinanet_loss, smooth_l1_loss
from focal_jax.ops.matching import batch_match_anchors, match_anchors
from focal_jax.models import (
    FPN,
    ResNet,
    RetinaNet,
    RetinaNetHead,
    retinanet_resnet50_fpn,
    retinanet_resnet50_fpn_v2,
    retinanet_resnet101_fpn,
)
from focal_jax.ops.nms import batched_nms, nms
from focal_jax.ops.postprocess import Detections, PostprocessConfig, postprocess

__version__ = "0.1.0"
