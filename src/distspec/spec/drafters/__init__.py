from distspec.spec.drafters.model import ModelDrafter
from distspec.spec.drafters.ngram import NgramDrafter

__all__ = ["ModelDrafter", "NgramDrafter"]
