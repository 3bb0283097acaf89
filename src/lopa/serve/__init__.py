"""Serving one frozen model to any number of soft-prompted tasks (DESIGN.md, "Serving without adapters").

One room per concern: ``protocol`` (rows, results, the ``Backend`` interface), ``wire`` (the
soft-prompt JSON format), ``backends/`` (what runs the model: ``transformers``, ``vllm``), ``batcher``
(requests of any tasks into shared batches), ``schemas``, ``checks``, ``errors``, ``middleware`` and
``metrics`` (the HTTP side), ``app`` (the routes), ``config`` and ``server`` (``lopa serve``).
Nothing here imports the methods, the wrapper, the artifacts or the client: the server knows no
generator, so it cannot grow per-task state.
"""
