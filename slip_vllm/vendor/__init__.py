"""Vendor side (offline, on the vendor's own machine): ``slip protect`` and test-model makers.

This code reads the original weights and writes both halves of an artifact. It never runs on the
host and is not imported by the vLLM plugin.
"""
