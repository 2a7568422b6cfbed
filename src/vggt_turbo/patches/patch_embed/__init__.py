"""Patches of the patch embed (the DINOv2 ViT-L that turns each frame into tokens): its projection, its attention
and slicing it over frames."""
