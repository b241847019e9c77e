"""trimode: an engine for tri-mode (AR / diffusion / self-speculative) NLD language models."""

from trimode.api import MODES, GenerationResult, TriMode, load

__version__ = "0.1.0"
__all__ = ["MODES", "GenerationResult", "TriMode", "load", "__version__"]
