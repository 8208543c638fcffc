"""vLLM-free core: decomposition, field arithmetic, wire codec and manifest.

Nothing in this package imports vLLM or holds secrets across calls: the vendor's offline transform,
the secure service and the host plugin all build on these pure pieces.
"""
