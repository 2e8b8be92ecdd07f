"""CUDA backend: GpuIndex, vectors resident on the device, scored with cuBLAS through CuPy."""

from gpu.device import gpu_available
from gpu.index import GpuIndex

__all__ = ["GpuIndex", "gpu_available"]
