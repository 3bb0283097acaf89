"""Serving one frozen model to any number of soft-prompted tasks (DESIGN.md, "Serving without adapters").

``wire`` (the soft-prompt JSON format), ``backends`` (what runs the model), ``batcher`` (requests of
any tasks into shared batches) and ``server`` (the HTTP API, ``lopa serve``). Nothing here imports
the methods, the wrapper, the artifacts or the client: the server knows no generator, so it cannot
grow per-task state.
"""
