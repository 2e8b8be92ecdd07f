"""cpu_fallback package."""
