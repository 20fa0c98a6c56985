"""`grpc.health.v1.Health`, bounded: grpcio-health-checking's servicer behind two limits.

Health is open to every caller, token or not (probes and load balancers
need it first), so what one caller can hold through it is bounded here
(issue 18 finding 3: 300 Watch streams, each naming a 3 MiB service, took
the server to 3.7 GB, and 3.1 GB stayed after they were cancelled: a Watch
holds its request for as long as it is open, and nothing counted them).

- A service name longer than `MAX_SERVICE_NAME_BYTES` names no service
  (ours are short): Watch ends at once INVALID_ARGUMENT (the protocol would
  keep it open, reporting SERVICE_UNKNOWN, for a service that might appear
  later; none can have such a name), so no such request outlives its call.
  Check holds nothing: NOT_FOUND, as for any unknown service.
- At most `max_watch_streams` Health Watch streams are open at once; beyond,
  RESOURCE_EXHAUSTED `OVERLOADED`. They are counted apart from
  ModelControl's Watch streams, which an anonymous caller must not be able
  to crowd out.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from lemonade_grpc.api import errors
from lemonade_grpc.core.errors import InvalidRequest, Overloaded

MAX_SERVICE_NAME_BYTES = 256


class BoundedHealth(health.aio.HealthServicer):
    """The standard health servicer, with bounded service names and Watch streams."""

    def __init__(self, max_watch_streams: int) -> None:
        super().__init__()
        self.max_watch_streams = max_watch_streams
        self.watching = 0

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        if len(request.service) > MAX_SERVICE_NAME_BYTES:
            await errors.abort(
                context,
                InvalidRequest(
                    f"service names are at most {MAX_SERVICE_NAME_BYTES} bytes; no service has this one"
                    f" ({len(request.service):,} characters)",
                    field="service",
                ),
            )
        if self.watching >= self.max_watch_streams:
            await errors.abort(
                context,
                Overloaded(
                    f"{self.watching} health Watch streams are open ([limits] max_health_watch_streams"
                    f" = {self.max_watch_streams}); retry later, or use Check"
                ),
            )
        self.watching += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watching -= 1
