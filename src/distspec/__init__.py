"""distspec: distributed speculative decoding."""

__version__ = "0.1.0"
