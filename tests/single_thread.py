"""A fixture that runs a test module's tests on one torch thread.

REC results never depend on the thread count (tests check that); on a shared 2-core runner, one
thread avoids the spin-waiting that makes small multi-threaded ops ten times slower.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
