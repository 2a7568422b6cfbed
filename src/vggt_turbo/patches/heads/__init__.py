"""Patches of the camera, depth and point heads (DPT): fused resizes and epilogues, layouts, the camera trunk's
one-token attention and running the heads concurrently."""
