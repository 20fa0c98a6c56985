"""The ModelControl servicer: proto in, pool call, proto out. No decisions here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import grpc

from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2_grpc as pb_grpc
from lemonade_grpc.api import convert, errors
from lemonade_grpc.core.errors import InvalidRequest
from lemonade_grpc.pool.pool import Pool

Context = grpc.aio.ServicerContext


class ModelControl(pb_grpc.ModelControlServicer):
    """The ModelControl service over a `Pool`."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._watch_messages = convert.WatchMessages()

    @property
    def _idle_default(self) -> int:
        return self._pool.settings.idle_unload_seconds

    @errors.stream
    async def Load(
        self, request: pb.LoadRequest, context: Context[pb.LoadRequest, pb.LoadResponse]
    ) -> AsyncGenerator[pb.LoadResponse, None]:
        job = self._pool.load(
            request.model,
            convert.requested_options(request.options, request.HasField("options")),
            request.pinned if request.HasField("pinned") else None,
        )
        async for progress in job.follow():
            yield convert.load_response(progress)
        yield convert.load_ready(await job.outcome(), self._idle_default)

    @errors.unary
    async def Unload(
        self, request: pb.UnloadRequest, context: Context[pb.UnloadRequest, pb.UnloadResponse]
    ) -> pb.UnloadResponse:
        # The unload is the pool's: a client that gives up waiting (cancelled,
        # deadline) does not cut it half-way (issue #9 finding 1).
        return pb.UnloadResponse(unloaded=await asyncio.shield(self._pool.unload(request.model)))

    @errors.unary
    async def Status(
        self, request: pb.StatusRequest, context: Context[pb.StatusRequest, pb.StatusResponse]
    ) -> pb.StatusResponse:
        return pb.StatusResponse(pool=convert.pool_status(self._pool.snapshot(), self._idle_default))

    @errors.unary
    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context[pb.ListModelsRequest, pb.ListModelsResponse]
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                convert.catalog_model(spec, self._pool.model_view(name), self._idle_default)
                for name, spec in sorted(self._pool.catalog.items())
            ]
        )

    @errors.unary
    async def Pin(
        self, request: pb.PinRequest, context: Context[pb.PinRequest, pb.PinResponse]
    ) -> pb.PinResponse:
        if not request.HasField("pinned"):
            raise InvalidRequest("pinned is required (true or false)", field="pinned")
        view = await self._pool.pin(request.model, request.pinned)
        return pb.PinResponse(status=convert.model_status(view, self._idle_default))

    @errors.unary
    async def Plan(
        self, request: pb.PlanRequest, context: Context[pb.PlanRequest, pb.PlanResponse]
    ) -> pb.PlanResponse:
        told = await self._pool.plan(
            request.model,
            convert.requested_options(request.options, request.HasField("options")),
            request.pinned if request.HasField("pinned") else None,
        )
        return convert.plan_response(told, self._idle_default)

    @errors.stream
    async def Watch(
        self, request: pb.WatchRequest, context: Context[pb.WatchRequest, pb.WatchResponse]
    ) -> AsyncGenerator[pb.WatchResponse, None]:
        bus = self._pool.bus
        # Subscribe before taking the snapshot: no event can fall between them.
        subscription = bus.subscribe()
        try:
            missed = bus.since(request.since_sequence) if request.HasField("since_sequence") else None
            if missed is None:
                resync = request.HasField("since_sequence")
                view = self._pool.snapshot()
                last = view.sequence
                yield convert.snapshot(view, self._idle_default, resync=resync)
            else:
                last = request.since_sequence
                for envelope in missed:
                    last = envelope.sequence
                    yield self._watch_messages.get(envelope, self._idle_default)
            messages = self._watch_messages
            while True:
                # One event per turn: a thousand Watch streams take turns
                # with the rest of the server (see pool/events.py).
                await subscription.wait()
                if subscription.closed is not None:
                    raise subscription.closed  # the server is shutting down
                if subscription.overflowed:
                    # We fell behind and events were dropped for us: a fresh
                    # snapshot, never a blocked pool.
                    subscription.reset()
                    view = self._pool.snapshot()
                    last = view.sequence
                    yield convert.snapshot(view, self._idle_default, resync=True)
                    continue
                taken = subscription.take()
                if taken is not None and taken.sequence > last:  # not covered by the snapshot or the replay
                    last = taken.sequence
                    # Built once for every subscriber, not once each.
                    yield messages.get(taken, self._idle_default)
        finally:
            subscription.close()
