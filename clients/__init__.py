"""Flower ClientApp wrapping fedseg's MONAI SegmentationTrainer."""
