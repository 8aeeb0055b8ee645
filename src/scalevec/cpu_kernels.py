from scalevec.ops.dnp_swiglu import enable  # noqa: F401  (the old import path, still used by train/trainer.py)
