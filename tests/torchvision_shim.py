"""TEST-ONLY shim: lets a torchvision whose compiled ops cannot load still be imported.

Why: the only torchvision wheels on this project's package index are CUDA builds (0.28.0 is
the one built against torch 2.13.0). Their `_C.so` links `libc10_cuda.so`, which torch
2.13.0+cpu does not ship, so the library fails to load. torchvision is written to survive
that (`torchvision.extension._has_ops()` becomes False and every compiled op raises a clear
"Couldn't load custom C++ ops" error), except for one spot: `_meta_registrations.py` calls
`torch.library.register_fake("torchvision::nms")` (and `"torchvision::qnms"`) without
checking `_has_ops()`, and registering a fake kernel for an operator that was never defined
raises `RuntimeError: operator torchvision::nms does not exist`, so `import torchvision`
fails as a whole.

What it does: only when torchvision is installed AND its `_C` extension fails to load, it
defines the two operator SCHEMAS (signatures copied from torchvision's own C++ registration)
so that import can finish. It registers no kernel: `torchvision.ops.nms` still raises
torchvision's own "Couldn't load custom C++ ops" error, as does every other compiled op.
What becomes usable is the pure-Python part (transforms.v2 on tensors, which is all that
transformers' image and video processors use). It never touches a torchvision whose `_C`
loads, never installs anything, and lives under tests/ only: the package never imports it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

import torch

#: the operators whose fake kernels `_meta_registrations.py` registers unconditionally, with
#: the signatures torchvision's compiled `_C` defines for them.
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

# Set by apply(): None (not applied), or a sentence saying why it was applied.
applied: str | None = None
_library = None  # keeps the torch.library.Library fragment alive


def _compiled_ops_error() -> str | None:
    """None if torchvision is absent or its `_C` extension loads; else why it cannot load.

    Does not import torchvision (a failed import would leave half-initialised modules).
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None  # not installed: nothing to shim (callers see a plain ImportError)
    lib_dir = list(spec.submodule_search_locations)[0]
    finder = importlib.machinery.FileFinder(
        lib_dir,
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
    )
    ext = finder.find_spec("_C")
    if ext is None or not ext.origin:
        return f"no compiled `_C` extension in {lib_dir}"
    try:
        torch.ops.load_library(ext.origin)  # what torchvision.extension does itself
    except (ImportError, OSError) as err:
        cause = err.__cause__ or err  # torch wraps the loader's message ("libX.so: cannot open")
        return f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
    return None


def _defined(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def apply() -> str | None:
    """Define the missing schemas if (and only if) torchvision's compiled ops cannot load.

    Returns (and stores in `applied`) why the shim was applied, or None if it was not needed.
    Must run before the first `import torchvision` in the process.
    """
    global applied, _library
    if applied is not None or "torchvision" in sys.modules:
        return applied
    error = _compiled_ops_error()
    if error is None:
        return None
    missing = [s for s in SCHEMAS if not _defined(s.split("(", 1)[0])]
    if missing:
        _library = torch.library.Library("torchvision", "FRAGMENT")
        for schema in missing:
            _library.define(schema)
    applied = (
        f"torchvision's compiled ops do not load with torch {torch.__version__} ({error}); "
        f"tests/torchvision_shim.py defined the schemas of "
        f"{', '.join('torchvision::' + s.split('(', 1)[0] for s in missing) or 'nothing'} "
        f"(no kernels) so that its pure-Python transforms import"
    )
    return applied


def python_m(module: str, *args: str) -> list[str]:
    """argv running `python -m module *args` in a child process, with the shim applied there
    first if it was applied here (a child process does not run tests/conftest.py).

    Unshimmed, this is exactly `python -m`; shimmed, `python -c` applies the shim and then runs
    the module the way `-m` does (runpy, as `__main__`, with sys.argv[0] set to its file).
    """
    if applied is None:
        return [sys.executable, "-m", module, *args]
    here = os.path.dirname(os.path.abspath(__file__))
    boot = (
        f"import sys; sys.path.insert(1, {here!r}); import torchvision_shim; "
        f"torchvision_shim.apply(); import runpy; "
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-c", boot, *args]
