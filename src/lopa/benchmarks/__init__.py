"""The benchmarks behind ``lopa bench NAME``: one module each, with ``main(argv) -> int``; ``common``
holds what they share (options, outputs, the machine, the result store, a server process).

Example::

    >>> sorted(BENCHMARKS)
    ['accuracy', 'code', 'serving', 'train-speed']
"""

# the name ``lopa bench`` takes -> the module under lopa.benchmarks
BENCHMARKS = {"accuracy": "accuracy", "code": "code", "serving": "serving", "train-speed": "train_speed"}
