"""The family adapters' public names, kept here for their many importers.

The generic `Adapter` lives in `families/base.py`; each family's knowledge in its own module under `families/`.
"""

from __future__ import annotations

from .families import *  # noqa: F403  (re-export)
from .families import __all__  # noqa: F401
