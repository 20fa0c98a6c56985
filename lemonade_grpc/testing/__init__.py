"""A harness for running real lemonade-grpc servers from tests, soaks and benchmarks.

One way to start a server on a free port and know its address
(`launch`, `ServerProcess`), to tell its processes and its backends apart
from everything else on the machine (`TAG_VAR`, `tagged_processes`), and to
make sure that nothing it started survives (`ServerProcess.stop`,
`kill_tagged`). The project's own tests, `bench/soak` and the benches use
it, and so may a program testing its client against a real server. Nothing
else in the package imports it (an import contract says so).
"""

from lemonade_grpc.testing.processes import TAG_VAR, cpu_model, is_gone, kill_tagged, tagged_processes
from lemonade_grpc.testing.server import LISTENING, ServerDidNotStart, ServerProcess, launch, serve_command

__all__ = [
    "LISTENING",
    "TAG_VAR",
    "ServerDidNotStart",
    "ServerProcess",
    "cpu_model",
    "is_gone",
    "kill_tagged",
    "launch",
    "serve_command",
    "tagged_processes",
]
