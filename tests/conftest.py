import os

import torch

# The Triton interpreter is chosen when a kernel is decorated, so this must run before
# videoanchor.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# No background compile of the SSC kernel (issue 93) in the tests' processes and those they
# start: a test that counts what a process compiled must see its own; tests/test_precompile.py
# turns it on where it tests it.
os.environ.setdefault("VIDEOANCHOR_PRECOMPILE", "0")

import pytest  # noqa: E402
import torchvision_shim  # noqa: E402

# Before anything imports torchvision (transformers does, for its processors): makes a
# torchvision whose compiled ops cannot load (the CUDA-only wheels on this package index, with
# torch+cpu) importable for its pure-Python transforms; a no-op anywhere else. Test-only.
torchvision_shim.apply()


# Property-based tests (tests/test_fuzz_kernels.py): "ci" is the default, derandomised (the
# same examples every run) and sized for CI; "long" runs on demand with
# `pytest --hypothesis-profile=long tests/test_fuzz_kernels.py`.
try:
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile(
        "ci", max_examples=30, derandomize=True, deadline=None, print_blob=True
    )
    _hyp_settings.register_profile("long", max_examples=600, deadline=None, print_blob=True)
    _hyp_settings.load_profile("ci")
except ImportError:  # hypothesis is a test extra; the fuzz tests import it themselves
    pass


def pytest_report_header(config):
    return f"torchvision shim: {torchvision_shim.applied or 'not applied'}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _steady_threads(request, monkeypatch):
    """One thread bound for the whole test. The bounds stay on (users run them), but they read
    the machine's load at each call, and two calls on one thread and on two differ in the
    last bits (docs/limitations.md): a test that repeats a call to compare it bitwise must not
    see the load change in between. tests/test_threads.py measures the live bounds."""
    if request.module.__name__.endswith("test_threads"):
        yield
        return
    from videoanchor.anchor import threads

    cores = threads.free_cores()
    monkeypatch.setattr(threads, "free_cores", lambda: cores)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _cache_in_tmp(tmp_path_factory):
    # `videoanchor run/anchors/tune` and the lmms-eval wrapper cache vision features and SSC
    # on disk by default: the tests keep that cache out of the home directory.
    old = os.environ.get("VIDEOANCHOR_CACHE")
    os.environ["VIDEOANCHOR_CACHE"] = str(tmp_path_factory.mktemp("videoanchor_cache"))
    yield
    if old is None:
        os.environ.pop("VIDEOANCHOR_CACHE", None)
    else:
        os.environ["VIDEOANCHOR_CACHE"] = old


@pytest.fixture(scope="module")
def memoised_ssc():
    """SSC results memoised for one test module (opt in with
    ``pytestmark = pytest.mark.usefixtures("memoised_ssc")``): SSC is deterministic (seeded)
    and modules that re-run the same visual tokens stay within their CPU budget."""
    import videoanchor.anchor as anchor

    original = anchor.compute_anchor_scores
    memo = {}

    def cached(features, *args, **kwargs):
        key = (
            tuple(features.shape),
            features.double().numpy().tobytes(),
            args,
            repr(sorted(kwargs.items())),
        )
        if key not in memo:
            memo[key] = original(features, *args, **kwargs)
        return memo[key]

    anchor.compute_anchor_scores = cached
    yield
    anchor.compute_anchor_scores = original


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny matmuls with 2 OpenMP threads on a loaded
    2-core machine are ~100x slower than with one (threads spin waiting for each other); the
    results do not depend on it. Request it, or ``pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
