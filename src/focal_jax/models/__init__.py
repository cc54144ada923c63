"""Flax linen modules of RetinaNet: ResNet backbone, FPN, shared heads."""

from focal_jax.models.cpu_rewrites import CpuRewrites, batch_norm_train
from focal_jax.models.fpn import FPN, upsample_nearest
from focal_jax.models.heads import RetinaNetHead, RetinaNetSubnet, prior_bias
from focal_jax.models.norms import BatchNorm, FrozenBatchNorm
from focal_jax.models.resnet import (
    RESNET_BLOCKS,
    RESNET_STAGE_SIZES,
    BasicBlock,
    BottleneckBlock,
    ResNet,
    build_resnet,
    trainable_mask,
)
from focal_jax.models.retinanet import (
    RetinaNet,
    retinanet_resnet50_fpn,
    retinanet_resnet50_fpn_v2,
    retinanet_resnet101_fpn,
)

__all__ = [
    "BasicBlock",
    "BatchNorm",
    "BottleneckBlock",
    "CpuRewrites",
    "FPN",
    "FrozenBatchNorm",
    "RESNET_BLOCKS",
    "RESNET_STAGE_SIZES",
    "ResNet",
    "RetinaNet",
    "RetinaNetHead",
    "RetinaNetSubnet",
    "batch_norm_train",
    "prior_bias",
    "build_resnet",
    "retinanet_resnet101_fpn",
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
    "trainable_mask",
    "upsample_nearest",
]
