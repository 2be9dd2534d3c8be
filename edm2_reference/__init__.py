"""EDM2 Config G reference client of phema (network, DDP training loop, sampler).

This package is the home of the reference client; its modules arrive with it.
"""
