"""Trickle: numbered HTTP segments streamed between gateway, orchestrator and container.

One small module per role, as in go-livepeer's ``trickle/`` package: ``protocol`` (headers,
status codes, job ids), ``server`` (the container side), ``publisher`` and ``subscriber``
(the client side, used by the node and the tests).
"""
