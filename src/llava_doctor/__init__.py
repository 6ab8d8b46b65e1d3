"""llava-doctor: diagnose, repair and merge LLaVA LoRA runs without executing a pickle."""

__version__ = "0.1.0"

__all__ = ["__version__"]
