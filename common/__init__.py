"""Helpers every layer uses: safe files, images, torchrun/DDP/FSDP2, the frozen encoders."""
