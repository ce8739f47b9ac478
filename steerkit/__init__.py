"""steerkit: find persona latents with sparse autoencoders and steer language models with them.

The library never imports typer or rich; the CLI in :mod:`steerkit.cli` is a thin layer over it.
"""

__version__ = "0.1.0"

from steerkit.errors import SteerkitError

__all__ = ["SteerkitError", "__version__"]
