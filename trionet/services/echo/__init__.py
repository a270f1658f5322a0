"""echo: RFC 862 over TCP (port 7001): every byte sent back.

server: EchoService; client: ``python -m trionet.client echo``.
"""

from .server import EchoService

__all__ = ["EchoService"]
