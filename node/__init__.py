"""The off-chain Livepeer node: one program, two roles (``-gateway`` and ``-orchestrator``)."""
