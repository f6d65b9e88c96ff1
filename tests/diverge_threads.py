"""A module fixture shared by the diverge tests: run torch on one thread.

The diverge tests push tiny models through torch; on a shared 2-core machine the hand-offs
between torch's worker threads cost far more than the work (a 32-wide GPT-2 forward took 117 ms
on two busy threads, 10 ms on one), so these tests pin one thread and restore it afterwards.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
