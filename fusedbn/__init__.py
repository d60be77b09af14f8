"""fusedbn: fused batch normalization for PyTorch."""
from ._ext import build_info
from .version import __version__
