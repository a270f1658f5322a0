"""guess: the number-guessing game (port 7002).

server: GuessService (the handler); rules: the game itself, no I/O;
client: ``python -m trionet.client guess`` (interactive or ``--auto``).
"""

from .server import GuessService

__all__ = ["GuessService"]
