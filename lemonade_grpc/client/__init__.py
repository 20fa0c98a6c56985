"""The Python client of lemonade-grpc (`async_client`), importable as `lemonade_grpc.client`.

The server never imports this package; the CLI does.
"""

from lemonade_grpc.client.async_client import DOMAIN, Client, ErrorDetails, connect, error_details

__all__ = ["DOMAIN", "Client", "ErrorDetails", "connect", "error_details"]
