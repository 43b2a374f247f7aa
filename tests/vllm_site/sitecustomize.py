"""TEST-ONLY: applies tests/torchvision_shim.py in every Python process of a vLLM test run.

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
