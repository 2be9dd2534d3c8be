"""EDM2 Config G reference client of phema: network, DDP/FSDP2 training, sampler, metric.

Modules: :mod:`~edm2_reference.mp` and :mod:`~edm2_reference.network` (the network),
:mod:`~edm2_reference.presets`, :mod:`~edm2_reference.loss`, :mod:`~edm2_reference.train`,
:mod:`~edm2_reference.data`, :mod:`~edm2_reference.sampler` and
:mod:`~edm2_reference.sample`, :mod:`~edm2_reference.metrics` and
:mod:`~edm2_reference.evaluate`.
"""

from edm2_reference.mp import FrozenModuleError, freeze
from edm2_reference.network import Block, Precond, UNet
from edm2_reference.presets import PRESETS, build_precond, get_preset

__all__ = [
    "PRESETS",
    "Block",
    "FrozenModuleError",
    "Precond",
    "UNet",
    "build_precond",
    "freeze",
    "get_preset",
]
