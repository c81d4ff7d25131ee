"""Collection rules for the whole tree (package doctests and tests).

A docstring whose every example is marked ``# doctest: +SKIP`` (an example of
a long build or of a file the reader has to supply) is documentation, not a
test: it is left out of the run instead of being reported as skipped.
"""

from __future__ import annotations

import doctest


def _only_skipped(item) -> bool:
    test = getattr(item, "dtest", None)
    if test is None or not test.examples:
        return False
    return all(example.options.get(doctest.SKIP, False) for example in test.examples)


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        (drop if _only_skipped(item) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
