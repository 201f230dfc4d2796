"""The test fixtures (``tests/_zoo.py``: trained digits models, MiniLM and its sentences, accuracy) for bench
scripts. They live with the tests, not in the installed package; the tests folder sits beside bench/ both
in the repository and in CI's copy, so it is put on ``sys.path`` from here.

    sys.path.insert(0, os.path.dirname(__file__))
    from _fixtures import zoo
"""
import os
import sys

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

import _zoo as zoo  # noqa: E402,F401
