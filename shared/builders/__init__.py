"""Model builders: the built-in models, made once on first use and cached.

``tiny_pair`` trains the tiny reverse-text teacher/student pair, ``tiny_verifier`` a yes/no judge for its task; ``smollm2`` converts SmolLM2-135M-Instruct
from its packaged GGUF file and derives layer-dropped students from it.  Both cache under
:func:`default_root`; a directory's name carries its recipe's version (and, for the tiny pair, a hash of the
recipe), never this package's path, so moving the code keeps every cached model.  Importing this package
imports nothing heavy.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_root() -> Path:
    """``$OPD_CACHE/models`` if ``OPD_CACHE`` is set, else ``~/.cache/opd/models``."""
    base = os.environ.get("OPD_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "opd") / "models"
