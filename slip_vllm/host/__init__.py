"""UNTRUSTED host side: the vLLM plugin.

Runs inside vLLM's processes on the host the vendor does not control. It holds only the public
residual W_D and the public manifest; the secret contribution of each protected layer arrives from
the secure service as a product for the current batch. Nothing here may depend on secret values.
"""
