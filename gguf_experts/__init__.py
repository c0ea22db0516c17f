"""gguf-experts: byte-exact expert maps, live routing traces and cache analysis for MoE GGUF models."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import GGUFExpertsError  # noqa: E402

__all__ = ["GGUFExpertsError", "__version__"]
