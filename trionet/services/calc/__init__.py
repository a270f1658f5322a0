"""calc: a safe calculator (port 7005).

server: CalcService; evaluator: the safe AST evaluator (pure);
client: ``python -m trionet.client calc``.
"""

from .server import CalcService

__all__ = ["CalcService"]
