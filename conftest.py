"""Root pytest configuration.

Doctest collection of ``phema/`` skips the integrations whose framework is not
installed (they are optional extras).
"""

import importlib.util

_FRAMEWORKS = {
    "phema/integrations/lightning.py": ("lightning", "pytorch_lightning"),
    "phema/integrations/transformers.py": ("transformers",),
}

collect_ignore = [
    path
    for path, modules in _FRAMEWORKS.items()
    if not any(importlib.util.find_spec(m) for m in modules)
]
