"""batchrun: declarative, resumable batches of optimization runs on Nextmv Cloud.

From Python: `batchrun.apply("manifest.yaml")`, `batchrun.plan(...)`,
`batchrun.validate(...)`. Imported lazily so that `import batchrun.emulator`
does not pull in the whole client.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Overrides", "apply", "plan", "validate"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import commands

        return getattr(commands, name)
    raise AttributeError(name)
