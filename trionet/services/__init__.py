"""The services shipped with trionet, one package each.

Each package holds a ``server`` module (the :class:`trionet.Service`
subclass), pure logic in modules named for what they hold (``rules``,
``room``, ``evaluator``...), and a ``client`` module whose ``client_main``
is ``python -m trionet.client NAME``. They are registered in
``pyproject.toml`` under the ``trionet.services`` and ``trionet.clients``
entry-point groups, exactly as a plugin registers its own.
"""
