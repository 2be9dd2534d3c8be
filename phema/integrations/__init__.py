"""Ready-made glue for training frameworks.

Each submodule imports its framework, which is an optional dependency:

- :mod:`phema.integrations.lightning`: a Lightning ``Callback``.
- :mod:`phema.integrations.transformers`: a Hugging Face ``TrainerCallback``.

Both drive the same :class:`~phema.integrations.tracker.EMATracker`, which can also
be used directly from any loop that has "after an optimizer step", "save" and
"load" hooks (accelerate: ``docs/accelerate.md``).
"""
