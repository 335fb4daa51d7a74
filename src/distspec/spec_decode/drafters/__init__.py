from distspec.spec_decode.drafters.model import ModelDrafter
from distspec.spec_decode.drafters.ngram import NgramDrafter

__all__ = ["ModelDrafter", "NgramDrafter"]
