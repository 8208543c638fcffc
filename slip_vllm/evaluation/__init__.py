"""Vendor-side evaluation tooling: the reference model, its corpus, training and quality metrics.

Everything here runs on the vendor's (or the evaluator's) own machine to produce evidence: it trains
and measures models in plain PyTorch/transformers. It never runs on the host and is not imported by
the vLLM plugin or the secure service.
"""
