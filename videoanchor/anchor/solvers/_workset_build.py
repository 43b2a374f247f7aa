"""How the working-set kernel (:mod:`._workset_kernel`, the maths) is built by Numba: its
pipeline less the passes it does not need, one LLVM module pass, its helpers linked into
it, the build options, the kernel's variants (module constants changed) and its on-disk
cache (issue 101 moved this here from the kernel's file; the cache, its lock and the
background compile's groups: :mod:`videoanchor.anchor._jit_cache`).

Every choice here leaves the kernel's machine arithmetic as it was: ``C`` the same bit for
bit (tests/test_workset.py, tests/test_precompile.py); they cut what Numba and LLVM do on
an empty cache (issue 79: ``first_call_cpu.json``'s history). The background compile
(:mod:`.precompile`) loads this file alone, beside the kernel's: it imports Numba, llvmlite
and the standard library, nothing of the package.
"""

from __future__ import annotations

import logging
import types as pytypes

from llvmlite import binding as llvm
from llvmlite import ir as llvm_ir
from numba.core import config, typed_passes, untyped_passes
from numba.core.codegen import CPUCodegen, JITCodeLibrary
from numba.core.compiler import CompilerBase, DefaultPassBuilder
from numba.core.compiler_machinery import PassManager
from numba.core.registry import CPUDispatcher
from numba.core.runtime.nrtopt import remove_redundant_nrt_refct

from videoanchor.anchor._jit_cache import jit_cached

__all__ = ["FASTMATH", "ONE_MODULE_PASS", "OPTIONS", "cached", "helper", "variant"]

#: Reassociation lets the compiler vectorise the dot products; NaN and inf keep their meaning.
#: (It is part of the kernel's arithmetic: its sums are summed in the vectorised order.)
FASTMATH = {"reassoc", "contract"}

#: Numba's passes for language features this module does not use (closures, ``inline=``
#: functions, ``literally``, ``literal_unroll``, ``with`` contexts): each walks the IR of
#: every function on an empty cache; code that needs one fails to compile, it is not
#: compiled otherwise. Nor SSA (Numba's ``enable_ssa=False`` form, as in its object mode):
#: each local keeps one type throughout (a name reused for an int and a float fails to
#: compile; the kernel's ``_SOLVE_LOCALS`` types those that start from a literal), and the
#: reconstruction walked every block for each reassigned name of :func:`._workset_kernel.solve_columns`
#: (issue 79: ``first_call_cpu.json``).
_UNUSED = (untyped_passes.WithLifting, untyped_passes.InlineClosureLikes,
           untyped_passes.MakeFunctionToJitFunction, untyped_passes.InlineInlinables,
           untyped_passes.FindLiterallyCalls, untyped_passes.LiteralUnroll,
           untyped_passes.LiteralPropagationSubPipelinePass, untyped_passes.ReconstructSSA,
           typed_passes.PreLowerStripPhis)  # fmt: skip


class _Library(JITCodeLibrary):
    """Numba's code library with one LLVM optimisation of each module where Numba runs three:
    its O3 function passes on each function before the module is linked and its O0 "cheap"
    module pass (inlining ahead of the reference-count pruner) are left out; the O3 module
    pass, which runs the pruner too, sees all of it. Not the same machine code (the stack
    frame and register choices differ), but ``C`` the same bit for bit and the solve as
    fast (issue 79: ``first_call_cpu.json``)."""

    def _optimize_functions(self, ll_module):
        ll_module.data_layout = self._codegen._data_layout

    def _optimize_final_module(self):
        if not config.LLVM_REFPRUNE_PASS:
            self._final_module = remove_redundant_nrt_refct(self._final_module)
        pm, pb = self._codegen._module_pass_manager()
        with self._recorded_timings.record("Module passes (full optimization)", pb):
            pm.run(self._final_module, pb)


#: Whether this Numba's code library is the one :class:`_Library` overrides: LLVM's new pass
#: manager (``_pass_builder``; Numba 0.65 and 0.68 checked). Older ones (0.60 builds its
#: module passes without it) keep Numba's own library (three optimisations).
ONE_MODULE_PASS = hasattr(CPUCodegen, "_pass_builder") and hasattr(
    JITCodeLibrary, "_optimize_final_module"
)


class _Linked(_Library):
    """A helper's library (:class:`_Helper`): its module is only linked into
    :func:`._workset_kernel.solve_columns`' one, whose module pass optimises it and whose object code holds
    it; it is neither optimised nor compiled to machine code on its own (issue 79: each
    helper's own module pass and object code cost 0.67 s of CPU on an empty cache, for code
    that nothing runs)."""

    def _optimize_final_module(self):
        pass

    def _finalize_final_module(self):
        # the JIT gets the function's environment pointer alone (Numba sets it after
        # lowering; the linked code, which raises no exception that needs it, has its own)
        env = llvm_ir.Module(self.name)
        for gv in self._final_module.global_variables:
            if gv.name.startswith("_ZN08NumbaEnv"):
                g = llvm_ir.GlobalVariable(env, llvm_ir.IntType(8).as_pointer(), gv.name)
                g.linkage, g.initializer = "common", llvm_ir.Constant(g.type.pointee, None)
        self._codegen._engine.add_module(llvm.parse_assembly(str(env)))
        self._finalized = True


class _Compiler(CompilerBase):
    """Numba's nopython pipeline less :data:`_UNUSED`, into a :class:`_Library` (a helper's:
    a :class:`_Linked`) where :data:`ONE_MODULE_PASS`, with Numba's dead-branch pruning
    before type inference (left out with the rewrites, ``no_rewrites``): a branch on a
    module constant such as the kernel's ``OUTLIERS`` is neither typed nor lowered where it is not
    taken (the lean kernel)."""

    def define_pipelines(self):
        if self.state.library is None and ONE_MODULE_PASS:
            codegen = self.state.targetctx.codegen()
            kind = _Linked if self.state.flags.no_cpython_wrapper else _Library
            self.state.library = kind(codegen, self.state.func_id.func_qualname)
            self.state.library.enable_object_caching()  # (as Numba's lowering pass does)
        pm = PassManager("workset kernel")
        for cls, what in DefaultPassBuilder.define_nopython_pipeline(self.state).passes:
            if cls not in _UNUSED:
                pm.add_pass(cls, what)
            if cls is untyped_passes.IRProcessing:
                pm.add_pass(untyped_passes.DeadBranchPrune, "dead branch pruning")
        pm.finalize()
        return [pm]


#: The options of the kernel and its helpers. ``no_rewrites`` (Numba's IR rewrites: constant
#: getitems and raises, array expressions, dead branches on constants) and
#: :class:`_Compiler` leave out passes that find nothing to do in this scalar code but take
#: their time on an empty cache (the same machine code as the full pipeline's); with
#: ``len()`` for ``.shape[k]`` and no ``max()`` (each compiled an overload), ``C`` is the
#: kernel's before bit for bit (issue 79: ``first_call_cpu.json``'s ``cut_*``).
OPTIONS = {"nogil": True, "fastmath": FASTMATH, "no_rewrites": True, "no_cfunc_wrapper": True}


class _Helper(CPUDispatcher):
    """A helper of :func:`._workset_kernel.solve_columns`, called from compiled code only (no wrappers to call
    it from Python or C), compiled for its declared signature alone when
    :func:`._workset_kernel.solve_columns` is typed, and not cached: its code is :func:`._workset_kernel.solve_columns`' own
    (linked into it), so a warm cache loads one function and compiles none (issue 79:
    ``first_call_cpu.json``)."""

    def __init__(self, py_func, sig):
        super().__init__(py_func, locals={}, pipeline_class=_Compiler,
                         targetoptions={**OPTIONS, "nopython": True, "boundscheck": None,
                                        "no_cpython_wrapper": True})  # fmt: skip
        self.declared = sig

    def get_call_template(self, args, kws):
        if self._can_compile:
            self.compile(self.declared)
            self.disable_compile()
        return super().get_call_template(args, kws)


def helper(sig):
    """A :class:`_Helper` for ``sig`` (the function itself under ``NUMBA_DISABLE_JIT``, as
    ``numba.njit`` gives)."""
    return lambda py_func: py_func if config.DISABLE_JIT else _Helper(py_func, sig)


def variant(py_func, name: str, **constants):
    """``py_func``'s code as a function ``name`` whose module constants ``constants`` differ
    (a copy of the module's globals): Numba compiles and caches it apart (its cache files are
    named after ``name``)."""
    glob = {**py_func.__globals__, **constants}
    func = pytypes.FunctionType(py_func.__code__, glob, name, py_func.__defaults__,
                                py_func.__closure__)  # fmt: skip
    func.__qualname__, func.__module__, func.__doc__ = name, py_func.__module__, py_func.__doc__
    return func


_log = logging.getLogger("videoanchor.kernel")
#: The kernels Numba keeps no cache of (:func:`cached`; it warns once, for the first).
UNCACHED: list[str] = []


def _warn_uncached(err) -> None:
    _log.warning("videoanchor: Numba cannot cache the SSC kernel (%s); each process compiles "
                 "it: set NUMBA_CACHE_DIR to a folder it can write to", err)  # fmt: skip


def cached(py_func, locals: dict):
    """``py_func`` (a kernel, typed with ``locals``) compiled by Numba through
    :class:`_Compiler` with :data:`OPTIONS` and its on-disk cache, or without one where Numba
    finds no folder it can write to (:func:`~videoanchor.anchor._jit_cache.jit_cached`: one
    line on the ``videoanchor.kernel`` logger), which a process then compiles each time.
    Compiled when first made ready, not here."""
    options = {"pipeline_class": _Compiler, "locals": locals, **OPTIONS}
    return jit_cached(py_func, options, UNCACHED, _warn_uncached)
