"""Telemetry: OpenTelemetry traces and metrics, a Prometheus endpoint, structured logs.

Off by default and then free: no SDK is imported, the pool's hooks and the
relay's calls go to no-op objects. On when the standard `OTEL_*` variables
name an OTLP endpoint, or `[telemetry] prometheus_listen` is set.
"""
