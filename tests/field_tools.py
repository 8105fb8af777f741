"""clean-fid's and OpenCLIP's own code, imported so that the suite can compare against them on a CPU torch.

Both packages import torchvision at module level, and PyPI's torchvision
wheels are CUDA builds: with the suite's CPU torch their C++ ops do not load,
torchvision 0.28's import fails, and once installed it also breaks
transformers' and diffusers' imports. So the suite installs the two packages
without their dependencies (docs/design.md, "Tests") and, where torchvision is absent,
imports them with a placeholder ``torchvision`` that exists only during the
import. The functions the tests compare against (clean-fid's
``frechet_distance`` and "clean" resizer, OpenCLIP's ``CLIP`` model) never
touch torchvision; anything that did would raise on first use, since every
class the placeholder hands out refuses to be constructed. Where a working
torchvision is installed, it is used as it is.
"""

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

INSTALL = "pip install --no-deps clean-fid==0.1.35 open-clip-torch==3.3.0"


def _refuse(qualname):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"{qualname} was used, but torchvision is only an import placeholder in the tests")
    return refuse


class _PlaceholderClass(type):
    """A class attribute read at import (e.g. ``InterpolationMode.BICUBIC`` as a default) is a marker string."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return f"<placeholder {cls.__qualname__}.{name}>"


class _PlaceholderModule(types.ModuleType):
    """Lower-case attributes are sub-modules, capitalised ones classes that cannot be constructed."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        qualname = f"{self.__name__}.{name}"
        if name[:1].islower():
            return _PlaceholderModule(qualname)
        return _PlaceholderClass(name, (), {"__init__": _refuse(qualname), "__qualname__": qualname})


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _PlaceholderModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


@contextlib.contextmanager
def _torchvision_placeholder():
    # transformers decides once, at its own import, whether torchvision exists: settle that before the placeholder.
    import transformers.utils.import_utils  # noqa: F401

    finder = _PlaceholderFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]


def _import(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        raise ImportError(f"{missing[0]} is not installed; the suite compares against it: {INSTALL}")
    has_torchvision = importlib.util.find_spec("torchvision") is not None
    with contextlib.nullcontext() if has_torchvision else _torchvision_placeholder():
        return [importlib.import_module(m) for m in modules]


def clean_fid():
    """(cleanfid.fid, cleanfid.resize)."""
    return _import("cleanfid.fid", "cleanfid.resize")


def open_clip_model():
    """open_clip.model (CLIP, CLIPTextCfg, CLIPVisionCfg)."""
    return _import("open_clip.model")[0]
