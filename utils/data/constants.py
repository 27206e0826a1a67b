"""Data constants shared by the data pipeline, the training scripts and the tools.

Names and values follow the published code so configs and checkpoints stay interchangeable.
"""
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_INCEPTION_MEAN,
    IMAGENET_INCEPTION_STD,
)

__all__ = [
    'IMAGENET_DEFAULT_MEAN', 'IMAGENET_DEFAULT_STD', 'IMAGENET_INCEPTION_MEAN', 'IMAGENET_INCEPTION_STD',
    'DEFAULT_CROP_PCT', 'SEG_IGNORE_INDEX', 'PAD_MASK_VALUE', 'COCO_SEMSEG_NUM_CLASSES',
    'NYU_MEAN', 'NYU_STD', 'DEPTH_PNG_SCALE', 'DEPTH_TRIM', 'DEPTH_STD_EPS', 'SEMSEG_STRIDE',
    'IMG_EXTENSIONS', 'IMAGE_TASKS',
]

DEFAULT_CROP_PCT = 0.875

# Label value ignored by segmentation losses and metrics.
SEG_IGNORE_INDEX = 255
# Value written into label maps for padded pixels (padding itself is tracked as a mask, not by this value).
PAD_MASK_VALUE = 254
# Pseudo labels come from a Mask2Former COCO-panoptic model: 80 things + 53 stuff.
COCO_SEMSEG_NUM_CLASSES = 133

# NYUv2 depth statistics (raw depth in millimetres) used by depth fine-tuning.
NYU_MEAN = 2070.7764
NYU_STD = 777.5723

# 16-bit depth PNGs are divided by this to give floats in [0, 1).
DEPTH_PNG_SCALE = 2 ** 16
# Truncated per-image depth standardisation: drop the lowest/highest 10 % before mean/var.
DEPTH_TRIM = 0.1
DEPTH_STD_EPS = 1e-6
# Semantic maps are fed to the model at 1/4 of the image resolution.
SEMSEG_STRIDE = 4

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp', '.jpx')

IMAGE_TASKS = ['rgb', 'depth', 'semseg', 'semseg_coco']

# Fine-tuning-only modalities: COCO pseudo labels, and the Taskonomy targets as {name: (channels, decoder)}.
PSEUDO_SEMSEG = 'pseudo_semseg'
TASKONOMY_TASKS = {
    'depth_zbuffer': (1, 'gray'), 'depth_euclidean': (1, 'gray'), 'edge_texture': (1, 'gray'),
    'edge_occlusion': (1, 'gray'), 'keypoints2d': (1, 'gray'), 'keypoints3d': (1, 'gray'),
    'normal': (3, 'rgb'), 'principal_curvature': (2, 'rgb'), 'reshading': (1, 'rgb'),
}
