import os
import sys
import warnings

import pytest
import torch

# The test fixtures (tests/_zoo.py, imported as ``import _zoo as zoo``): with --import-mode=importlib tests/
# is not on sys.path by itself.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


def pytest_sessionstart(session):
    """In CI (CI=true) the tests must import the installed wheel, never the source tree: a module left out
    of the wheel, or a template missing from its package data, must fail here, not hide behind the repo."""
    import os

    import qcompile
    import qcompile.backends
    import qcompile.passes
    if os.environ.get("CI", "").lower() != "true":
        return
    here = os.path.realpath(os.path.join(os.path.dirname(__file__), ".."))
    for mod in (qcompile, qcompile.passes, qcompile.backends):
        f = os.path.realpath(mod.__file__)
        if "site-packages" not in f or f.startswith(here + os.sep):
            raise pytest.UsageError(f"CI=true but {mod.__name__} is imported from {f}, not from an installed "
                                    f"wheel: run the tests through .ci/run (a fresh venv with the wheel)")
        venv = os.environ.get("QCOMPILE_TEST_INSTALLED")
        if venv and not f.startswith(os.path.realpath(venv) + os.sep):
            raise pytest.UsageError(f"{mod.__name__} is imported from {f}, not from the CI venv {venv}")
