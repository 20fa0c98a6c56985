"""`python -m lemonade_grpc` is the `lemonade-grpc` command."""

import sys

from lemonade_grpc.cli.main import main

sys.exit(main())
