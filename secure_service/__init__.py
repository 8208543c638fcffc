"""TRUSTED side: the secure service that holds the secret bundle (brief §1, §4, §7).

Runs beside the untrusted vLLM host (in a TEE, confidential VM or the vendor's box). It loads the
secret factors, answers data-plane calls with the secret contribution of one protected layer for a
whole batch, and never sends factors, only products. It must never import vLLM.
"""
