"""The model owner's offline tooling (on the vendor's own machine): ``slip protect`` and test-model makers.

* ``artifact``: ``protect()`` turns a checkpoint into OUT/public and OUT/secret (protocol ``split``,
  and the shared steps: config checks, non-weight files, staging, manifest);
* ``shielded``: the ``shielded`` protocol's writer (quantized, locked public GEMMs and the bundle);
* ``tiny_models``: small random Hugging Face checkpoints made on the fly for tests and benchmarks.

This code reads the original weights and writes both halves of an artifact. It never runs on the
host and is not imported by the vLLM plugin.
"""
