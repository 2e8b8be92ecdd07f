"""Host (numpy BLAS) backend: CpuIndex, the exact index that runs everywhere."""

from cpu_fallback.index import CpuIndex

__all__ = ["CpuIndex"]
