from distspec.spec_decode.drafters.model import ModelDrafter
from distspec.spec_decode.drafters.ngram import NgramDrafter
from distspec.spec_decode.drafters.recycle import RecycleDrafter
from distspec.spec_decode.drafters.suffix import SuffixDrafter, SuffixStore

__all__ = ["ModelDrafter", "NgramDrafter", "RecycleDrafter", "SuffixDrafter", "SuffixStore"]
