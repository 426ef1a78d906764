"""GPU kernels. Imported lazily: Triton is only needed (and only present) on CUDA machines."""
