"""A fault the test's backend cannot make (``tests.harness.cluster.Unsupported``) is a skip that says why."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests.harness.cluster import Unsupported


def _skip_unsupported() -> Generator[None, object, object]:
    try:
        return (yield)
    except Unsupported as exc:
        pytest.skip(str(exc))


pytest_runtest_setup = pytest.hookimpl(wrapper=True)(lambda item: (yield from _skip_unsupported()))
pytest_runtest_call = pytest.hookimpl(wrapper=True)(lambda item: (yield from _skip_unsupported()))
