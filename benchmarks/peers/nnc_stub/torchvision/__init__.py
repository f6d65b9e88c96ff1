"""A stand-in for torchvision in the NNCodec peer venv: the CUDA-built torchvision wheel cannot
load its operators beside the CPU torch, and NNCodec only imports torchvision for its dataset
and model helpers, which the peer benchmark never calls."""
import types
datasets = types.ModuleType("torchvision.datasets")
transforms = types.ModuleType("torchvision.transforms")
models = types.ModuleType("torchvision.models")
class _Any:
    def __getattr__(self, name): return _Any()
    def __call__(self, *a, **k): return _Any()
class _Base:  # what a dataset class may subclass
    def __init__(self, *a, **k): pass
def _attr(name):
    return _Base if name[:1].isupper() else _Any()
for _m in (datasets, transforms, models):
    _m.__getattr__ = _attr
import sys
sys.modules["torchvision.datasets"] = datasets; sys.modules["torchvision.transforms"] = transforms; sys.modules["torchvision.models"] = models
