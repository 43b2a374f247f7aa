"""transformers integration: ``attn_implementation="videoanchor_triton"`` and :func:`configure`.

The only subpackage that knows model families (see :mod:`videoanchor.integrations.transformers.registry`).
:func:`register` runs once transformers is imported beside ``import videoanchor``
(:func:`register_when_imported`): it registers the attention and mask
functions with transformers and makes every base VLM model loaded with that name install its
VideoAnchor hooks at construction time (a wrapper around ``PreTrainedModel.post_init``), so
that ``from_pretrained(..., attn_implementation="videoanchor_triton")`` is the only change a
user needs.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

from videoanchor.integrations.options import AnchorConfig
from videoanchor.integrations.transformers.attention import (
    ATTN_IMPLEMENTATION,
    reset_warnings,
    videoanchor_attention_forward,
    videoanchor_mask,
)
from videoanchor.integrations.transformers.configuring import configure
from videoanchor.integrations.transformers.handle import AnchorHandle, find_handle
from videoanchor.integrations.transformers.registry import (
    FAMILIES,
    FamilySpec,
    VisualSegment,
    get_family,
    supported_families,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AnchorConfig",
    "AnchorHandle",
    "FAMILIES",
    "FamilySpec",
    "VisualSegment",
    "configure",
    "find_handle",
    "get_family",
    "register",
    "register_when_imported",
    "reset_warnings",
    "supported_families",
    "videoanchor_attention_forward",
    "videoanchor_mask",
]

_registered = False


def register() -> None:
    """Register ``"videoanchor_triton"`` with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    try:
        from transformers import AttentionInterface, PreTrainedModel
    except Exception as err:  # transformers' lazy import wraps the cause in its own error
        problem = _torchvision_problem(err)
        if problem is None:
            raise
        raise ImportError(problem) from None  # the cause is in the one line
    from transformers.masking_utils import AttentionMaskInterface

    from videoanchor.integrations.transformers.configuring import maybe_install

    AttentionInterface.register(ATTN_IMPLEMENTATION, videoanchor_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, videoanchor_mask)

    original = PreTrainedModel.post_init
    if not getattr(original, "_videoanchor_wrapped", False):

        def post_init(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            maybe_install(self)
            return out

        post_init._videoanchor_wrapped = True
        post_init.__wrapped__ = original
        post_init.__doc__ = original.__doc__
        PreTrainedModel.post_init = post_init
    _registered = True


def register_when_imported() -> None:
    """:func:`register` now if transformers is imported, else right after it is (an import
    hook that fires once), so that ``import videoanchor`` does not import transformers. Where
    transformers cannot be imported (a torchvision that does not load with this torch), one
    warning says so: the kernels and the anchor scores do not need it."""
    if "transformers" in sys.modules:
        _register_or_warn()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


def _register_or_warn() -> None:
    try:
        register()
    except ImportError as err:
        warnings.warn(
            f"{err}. The kernels and the anchor scores work; the transformers integration "
            "(attn_implementation='videoanchor_triton', videoanchor.configure) is off",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds ``transformers`` for the import system, once, and runs :func:`register` after
    its module has run."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # once; and the finders after it find the real module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register_or_warn()

        spec.loader.exec_module = exec_module
        return spec


def _torchvision_problem(err: BaseException) -> str | None:
    """One line saying what to install, when transformers failed to import because the
    installed torchvision cannot load with this torch (e.g. a CUDA torchvision wheel beside a
    CPU torch: its compiled ops fail, and ``import torchvision`` raises "operator
    torchvision::nms does not exist" deep inside transformers' image utilities); else None."""
    import importlib.metadata
    import traceback

    chain, seen = [], set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    in_torchvision = any(
        "torchvision" in str(x)
        or any("torchvision" in (f.filename or "") for f in traceback.extract_tb(x.__traceback__))
        for x in chain
    )
    if not in_torchvision:
        return None
    import torch

    try:
        tv = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        tv = "(unknown version)"
    root = chain[-1]
    cause = f"{type(root).__name__}: {(str(root).strip().splitlines() or [''])[0]}"
    return (
        f"videoanchor: transformers cannot be imported because the installed torchvision {tv} "
        f"does not load with torch {torch.__version__} ({cause}); install the torchvision "
        f"built for torch {torch.__version__} (the same CPU or CUDA variant as torch), or "
        "uninstall torchvision (pip uninstall torchvision) if you do not need transformers' "
        "image and video processors"
    )
