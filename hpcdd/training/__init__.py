"""Training: the one epoch loop and its checkpoints (``engine``), one model or a fused group on one
split (``fit``), random streams that make a training reproducible on any rank count (``rng``), and
the CPU/GPU speed switches (``acceleration``)."""
