"""Soak: a real server under 50 random clients and a chaos task, its invariants checked as it runs.

`make soak` (not part of `make test`; bounded to 10 minutes). One server
(`python -m lemonade_grpc serve`) on a catalog of the bundled tiny model run
by the real llama-server and four fake OpenAI-compatible backends
(tests/fake_backend.py, run as a file through the `command` recipe), with
fewer slots than models so that loads evict. Then, for `--duration` seconds:

- `--clients` clients, each on its own channel, call Load, Unload, Pin,
  Plan, Status, ListModels, Watch, Complete and Chat at random, giving up at
  random points: a short deadline, or a cancel after a random number of
  stream messages;
- a chaos task SIGKILLs a backend taken from Status (or one still loading)
  every few seconds, and now and then SIGSTOPs one (a hang);
- a monitor holds one Watch stream open for the whole run and checks its
  sequence numbers and the pins;
- every `--check-interval` seconds the invariants below are checked.

Invariants (each failure is printed and makes the exit status 1):

- Status: no model twice, per type at most `max_loaded` models holding a
  slot (`used` agrees), pinned <= used;
- every READY model's pid is alive and its port answers `GET /health` 200
  (re-checked once a moment later, and not for a pid the chaos task just
  hit, before counting as a failure);
- no backend process the server started is missing from Status for long
  (the server's descendants read from /proc, against Status's pids), and
  never more live backends of a type than its slots (sampled every 0.1 s);
- every failed RPC has a known (code, ErrorInfo reason) pair of docs/api.md
  and a reason a valid request can get; never INTERNAL or UNKNOWN; a stream
  that ends OK ends as its RPC promises (READY, a finish reason);
- Watch: gap-free sequence numbers on every stream (resumed ones too), the
  long-lived stream keeps delivering, a pinned READY model is never evicted
  (LRU, idle, memory), every backend the chaos task killed is reported;
- at rest at the end: no load in flight, the live backends are Status's,
  pins.json holds the pinned models;
- resources: the server's RSS, file descriptors and threads with the pool
  empty and clients idle, after the warm-up and at the end: RSS growth under
  10 %, descriptors and threads back to the baseline (small slack). The
  server exposes no asyncio task count: threads are what can be measured
  from outside;
- shutdown: SIGTERM with models loaded and streams running exits 0 and no
  process carrying the run's tag is left; no ERROR record or traceback in
  the server log.

Prints a summary (operations by kind and outcome, kills, checks) and writes
it to bench/results/soak-<date>.txt. Usage:
`python bench/soak [--duration S] [--clients N] [--seed N]` (or
`python -m soak` with bench/ on the path).

The server's RSS is sampled every `--trend-every` seconds under load
(printed as it is read, and in the summary with the change over the run's
second half). `--unbounded` lifts the 10-minute bound for an investigative
run (issue 18 finding 15: eight minutes could not tell an allocator
settling from a slow leak); `make soak` never passes it.

The modules, one job each: `record` (what is counted, violations, how a
failed call is judged), `server` (the catalog, config and the server,
started on the shared harness `lemonade_grpc.testing`), `processes` (live
backends, resources), `monitor` (Watch sequences, the long-lived stream),
`clients`, `chaos`, `invariants`, `run` (the phases), `report` (the
summary) and `__main__` (arguments, bounds, cleanup).
"""
