"""Operators the model calls but never builds: each has a PyTorch formulation that runs anywhere, and a
hand-written kernel that an explicit ``enable(model)`` switches on from outside the model (the trainer, the
benchmarks, loading a run), where the model's device is known."""
