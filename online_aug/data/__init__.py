from .datasets import DIGIT_NAMES, LabeledImages, Splits, build_splits, scan_image_folder
from .longtail import class_order, longtail_counts, longtail_indices

__all__ = ["DIGIT_NAMES", "LabeledImages", "Splits", "build_splits", "scan_image_folder", "class_order",
           "longtail_counts", "longtail_indices"]
