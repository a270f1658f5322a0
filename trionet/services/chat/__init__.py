"""chat: a multi-user chat room (port 7003).

server: ChatService (the handler); room: members and relay rules;
text: parsing and sanitising lines; flood: the token bucket;
client: ``python -m trionet.client chat``.
"""

from .server import ChatService

__all__ = ["ChatService"]
