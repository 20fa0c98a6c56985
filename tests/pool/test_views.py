"""Views: a backend's memory is read at most once per `RSS_MAX_AGE_SECONDS`, not at every Status or Load."""

from __future__ import annotations

from typing import cast

from lemonade_grpc.backends.process import BackendProcess
from lemonade_grpc.pool.views import RssSamples


class CountedProcess:
    """A process whose every memory reading is counted, its RSS growing by one byte each time."""

    def __init__(self) -> None:
        self.reads = 0

    def rss_bytes(self) -> int:
        self.reads += 1
        return 1000 + self.reads


def test_memory_is_read_again_only_once_the_last_reading_is_old() -> None:
    # Issue 13: the /proc walk behind each reading was a third of a no-op Load.
    now = [100.0]
    samples = RssSamples(max_age=0.5, clock=lambda: now[0])
    process, other = CountedProcess(), CountedProcess()
    assert samples.rss_bytes(cast(BackendProcess, process)) == 1001
    now[0] += 0.4
    assert samples.rss_bytes(cast(BackendProcess, process)) == 1001  # a Status right after: no read
    assert samples.rss_bytes(cast(BackendProcess, other)) == 1001  # each process has its own reading
    now[0] += 0.1
    assert samples.rss_bytes(cast(BackendProcess, process)) == 1002  # 0.5 s old: read again
    assert (process.reads, other.reads) == (2, 1)
