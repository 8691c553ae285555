"""online_aug: online generative data augmentation (few-step SDEdit with soft labels) for image classifiers."""

__version__ = "0.1.0"
