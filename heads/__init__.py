"""MaskFormer-style heads, the matcher, losses and post-processing; box detectors' decoders and their box matcher,
criterion and post-processing (box_*)."""
