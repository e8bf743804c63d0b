"Shared pytest fixtures: the real-data location (tests marked `data` skip when it is absent)."
import os
import pytest
os.environ.setdefault('MPLBACKEND', 'Agg')
from fsmis.core import data_root as _data_root


@pytest.fixture(scope='session')
def data_root():
    "Path of ../shared/data (or $FSMIS_DATA); skips the test with a clear message when absent."
    root = _data_root()
    if root is None: pytest.skip('real data not found: set FSMIS_DATA to the folder holding chaos_t2/ and ms_cmrseg_bssfp/')
    return root


def pytest_collection_modifyitems(config, items):
    "Skip every test marked `data` when the real datasets are absent."
    if _data_root() is not None: return
    skip = pytest.mark.skip(reason='real data not found (FSMIS_DATA unset and no ../shared/data)')
    for item in items:
        if 'data' in item.keywords: item.add_marker(skip)
