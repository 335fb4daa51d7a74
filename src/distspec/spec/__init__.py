"""Speculative decoding algorithms: drafters, the verifier, the decoding loop."""
