"""fusedbn: fused batch normalization for PyTorch.

    import fusedbn
    bn = fusedbn.FusedBatchNorm2d(64)          # instead of nn.BatchNorm2d(64)
    model = fusedbn.convert_batchnorm(model)   # or convert a whole model
    model = fusedbn.FusedSyncBatchNorm.convert_sync_batchnorm(model)   # multi-process training
    model = fusedbn.convert_batchnorm(model, fuse_activations=True)  # + BN (-> add) -> ReLU fused
"""
from . import act_ops, functional, ops
from ._ext import build_info
from .act_modules import FusedBatchNormAct1d, FusedBatchNormAct2d, FusedBatchNormAct3d
from .convert import convert_batchnorm, revert_batchnorm
from .distributed import RankFailedError
from .modules import FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d
from .sync import FusedSyncBatchNorm
from .version import __version__

__all__ = [
    "FusedBatchNorm1d",
    "FusedBatchNorm2d",
    "FusedBatchNorm3d",
    "FusedSyncBatchNorm",
    "RankFailedError",
    "FusedBatchNormAct1d",
    "FusedBatchNormAct2d",
    "FusedBatchNormAct3d",
    "build_info",
    "convert_batchnorm",
    "functional",
    "revert_batchnorm",
    "__version__",
]
