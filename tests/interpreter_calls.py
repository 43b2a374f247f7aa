"""Test-only: Triton's CPU interpreter without its repeated patching at each device call.

At a launch, Triton's interpreter patches ``triton.language`` for the kernel's module
(``_patch_lang``: ``inspect.getmembers`` over ``tl``, ``tl.tensor``, ``tl.math``, about 3 ms),
and it patches again at every call of a ``@triton.jit`` function from inside the kernel,
while the launch's patch is still in place (the call's own patch is never restored). A
kernel that calls its helpers in its loops (issue 76's working-set kernel, since replaced:
thousands of calls a launch) spent half its interpreted time there (cProfile, triton 3.9).

The same holds for triton.language's own ``@jit`` functions (``tl.sum``, ``tl.max``, ...),
whose module it patches again at each of their calls. Within :func:`quick_device_calls` a
launch patches each module's globals once: the kernel's at its start (as before), a device
function's at the launch's first call into that module (as before: that patch stays in
place until the launch ends, restored or not as before), and a later call into a module
already patched in the same launch is made without the repeat (the same objects patched by
the same code again). Nothing the kernel computes
changes (tests/test_workset_cuda.py checks two passes bitwise with and without it). Like
tests/bf16_interpreter.py it checks the interpreter's internals it relies on and says why
where they are not there.
"""

from __future__ import annotations

import contextlib


def unavailable_reason() -> str | None:
    try:
        from triton.runtime import interpreter
    except Exception as exc:
        return f"triton's interpreter is not importable: {exc}"
    for name in ("_patch_lang", "_LangPatchScope", "GridExecutor", "InterpretedFunction"):
        if not hasattr(interpreter, name):
            return f"this triton's interpreter has no {name}"
    return None


@contextlib.contextmanager
def quick_device_calls():
    """Within this block the interpreter patches each module once per launch. Yields a
    context manager under which it runs as it came (to compare the two)."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    from triton.runtime import interpreter

    original_patch, original_call = interpreter._patch_lang, interpreter.GridExecutor.__call__
    launches = []  # per launch running (one at a time): the ids of the globals it patched

    def patch_lang(fn):
        if launches and id(fn.__globals__) in launches[-1]:
            return interpreter._LangPatchScope()  # (nothing to restore: nothing changed)
        scope = original_patch(fn)
        if launches:
            launches[-1].add(id(fn.__globals__))
        return scope

    def call(self, *args, **kwargs):
        launches.append(set())
        try:
            return original_call(self, *args, **kwargs)
        finally:
            launches.pop()

    @contextlib.contextmanager
    def as_it_came():
        interpreter._patch_lang, interpreter.GridExecutor.__call__ = original_patch, original_call
        try:
            yield
        finally:
            interpreter._patch_lang, interpreter.GridExecutor.__call__ = patch_lang, call

    interpreter._patch_lang, interpreter.GridExecutor.__call__ = patch_lang, call
    try:
        yield as_it_came
    finally:
        interpreter._patch_lang, interpreter.GridExecutor.__call__ = original_patch, original_call
