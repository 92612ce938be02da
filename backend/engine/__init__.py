"""Text2Video-Zero itself: the denoising loop, cross-frame attention and motion; tensors in,
tensors out (no files, no jobs)."""
