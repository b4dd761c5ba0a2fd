"""pytest plugin for the mutation runs (``-p tests.mutation.plugin`` in ``[tool.mutmut]``).

Each mutant is judged by its own test run, so a property test must judge every mutant
by the same examples: derandomized, and without the example database, through which a
failure found against one mutant would be replayed against every later one.
"""

from __future__ import annotations

import pytest
from hypothesis import settings

settings.register_profile("mutation", deadline=None, derandomize=True, database=None)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems() -> None:
    # After tests/conftest.py loaded its own profile: this one wins for the run.
    settings.load_profile("mutation")
