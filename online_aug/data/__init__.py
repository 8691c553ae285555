from .datasets import (
    DIGIT_NAMES,
    PARTS,
    EditSourceReader,
    LabeledImages,
    Splits,
    attach_masks,
    build_splits,
    check_disjoint,
    check_generator_data,
    check_generator_folders,
    scan_image_folder,
    seen_record,
)
from .longtail import class_order, diffmix_counts, longtail_counts, longtail_indices, longtail_plan

__all__ = ["DIGIT_NAMES", "EditSourceReader", "PARTS", "LabeledImages", "Splits", "attach_masks", "build_splits",
           "check_disjoint",
           "check_generator_data", "check_generator_folders", "scan_image_folder", "seen_record", "class_order",
           "diffmix_counts", "longtail_counts", "longtail_indices", "longtail_plan"]
