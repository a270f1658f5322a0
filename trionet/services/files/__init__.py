"""files: read-only file download with sha256 and resume (port 7004).

server: FilesService; paths: which names may be served; digest: the
sha256 cache; client: ``python -m trionet.client files list|get``.
"""

from .server import FilesService

__all__ = ["FilesService"]
