"""The test suite's own machinery."""

import os


def test_workers_keep_each_expensive_fixture_on_one_worker(request):
    """With ``-n 2 --dist loadgroup`` (the README's command) every test carries its xdist group in
    its node id (conftest's ``_group_for_workers``); without it an expensive fixture is built on
    each worker. pytest 9.2 silently broke that (github.com/pytest-dev/pytest-xdist/issues/1386), hence ``pytest<9.2``."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return  # one process: nothing to distribute
    assert request.node.nodeid.endswith("@test_suite.py:rest"), request.node.nodeid
