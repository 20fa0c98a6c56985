"""Leases: one request's hold on a READY model, behind admission's stream slots.

A READY model is leased without the load lock; one that is not READY is
loaded first through the locked path (joining a load in flight). A leased
model is never idle-unloaded, and a stop gives its requests their grace.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from lemonade_grpc.core.errors import LoadAbortedByShutdown, ModelNotLoaded, ShuttingDown
from lemonade_grpc.core.options import RequestedOptions
from lemonade_grpc.core.settings import Limits
from lemonade_grpc.pool.admission import Admission, AdmissionView
from lemonade_grpc.pool.jobs import LoadOrigin
from lemonade_grpc.pool.loader import Loader
from lemonade_grpc.pool.model import Lease
from lemonade_grpc.pool.stops import cancel_idle
from lemonade_grpc.pool.supervision import Supervisor
from lemonade_grpc.pool.table import ModelTable


class Leases:
    """The requests holding models, and the stream slots they wait for. Loop thread only."""

    def __init__(
        self,
        limits: Limits,
        *,
        table: ModelTable,
        loader: Loader,
        supervisor: Supervisor,
        clock: Callable[[], float],
        closing: asyncio.Event,
    ) -> None:
        self._table = table
        self._loader = loader
        self._supervisor = supervisor
        self._clock = clock
        self._closing = closing
        self._admission = Admission(
            max_streams=limits.max_streams,
            max_streams_per_model=limits.max_streams_per_model,
            max_queued=limits.max_queued_streams,
        )
        self._streams = 0
        self._no_streams = asyncio.Event()
        self._no_streams.set()

    def view(self) -> AdmissionView:
        return self._admission.view()

    def close(self) -> None:
        """Refuse new requests; those waiting for a slot end SHUTTING_DOWN."""
        self._admission.close()

    async def drain(self, seconds: float) -> None:
        """Wait up to `seconds` for the inference streams running to end."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_streams.wait(), seconds)

    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[Lease]:
        """See `Pool.lease`; `name` is a catalog name."""
        async with self._admission.admit(name):
            model = self._table.ready(name)
            if model is None:
                try:
                    job = self._loader.load(name, RequestedOptions(), None, LoadOrigin.INFERENCE)
                    await job.outcome()
                except LoadAbortedByShutdown as error:
                    raise ShuttingDown(error.message) from None
                model = self._table.ready(name)
                if model is None:
                    raise ModelNotLoaded(f"{name} was unloaded before the request could start")
            if self._closing.is_set():
                raise ShuttingDown("the server is shutting down")
            assert model.backend is not None
            lease = Lease(model.backend)
            model.leases.add(lease)
            model.no_leases.clear()
            self._streams += 1
            self._no_streams.clear()
            cancel_idle(model)
            model.last_used_at = self._clock()
            try:
                yield lease
            finally:
                model.leases.discard(lease)
                model.last_used_at = self._clock()
                self._streams -= 1
                if not self._streams:
                    self._no_streams.set()
                if not model.leases:
                    model.no_leases.set()
                    self._supervisor.arm_idle(model)
