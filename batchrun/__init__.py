"""batchrun: declarative, resumable batches of optimization runs on Nextmv Cloud."""

from .commands import Overrides, apply, plan, validate

__all__ = ["Overrides", "apply", "plan", "validate"]
__version__ = "0.1.0"
