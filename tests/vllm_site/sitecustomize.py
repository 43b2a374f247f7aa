"""TEST-ONLY: applies tests/torchvision_shim.py in every Python process of a vLLM test run,
where ``VIDEOANCHOR_TEST_FAIL_EPS`` is set, makes ``compute_anchor_scores`` raise for
calls with that ``eps`` (tests/test_vllm_server.py: a request whose scoring fails), and
where ``VIDEOANCHOR_TEST_EXACT_MAX_TOKENS`` is set, lowers the exact limit of the SSC plan
to it (tests/test_vllm.py: a long video, past the limit, in a real engine's processes).

vLLM starts fresh interpreters of its own (the model-inspection subprocess, the engine-core
process of the OpenAI server), which import transformers' video processor and so
torchvision; tests/test_vllm*.py put this folder on PYTHONPATH for them. The package never
imports it.
"""

import os
import sys

_tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _tests not in sys.path:
    sys.path.append(_tests)
import torchvision_shim  # noqa: E402

torchvision_shim.apply()

_fail_eps = os.environ.get("VIDEOANCHOR_TEST_FAIL_EPS")
if _fail_eps is not None:
    import videoanchor.anchor as _anchor

    _orig = _anchor.compute_anchor_scores

    def _failing(*args, **kwargs):
        if kwargs.get("eps") == float(_fail_eps):
            raise RuntimeError(f"injected scoring failure (eps {_fail_eps})")
        return _orig(*args, **kwargs)

    _anchor.compute_anchor_scores = _failing

_exact_max = os.environ.get("VIDEOANCHOR_TEST_EXACT_MAX_TOKENS")
if _exact_max is not None:
    from videoanchor.anchor import plan as _plan

    _plan.EXACT_MAX_TOKENS = int(_exact_max)
