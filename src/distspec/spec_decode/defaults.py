"""Defaults every door shares (engine, server, drafter workers, CLI), torch-free so that the
CLI's parser can read them without loading the engine."""

# A copy of the target with int4 layers, an int8 head and int8 activations (models/self_draft):
# on the demo target the fastest drafter measured (docs/drafter.md).
DEFAULT_DRAFTER = "self"
# the longest draft; the adaptive policy picks shorter ones when they pay more
DEFAULT_GAMMA = 12
DRAFTER_HELP = (
    "self | self-int4 | self-int8 | self-bf16 | demo | ngram | suffix | recycle | "
    "PATH (HF dir or .gguf)"
)
# the tree width of bench contenders named ...-tree (most children per draft node)
BENCH_TREE_WIDTH = 3
# what the draft-length policy assumes of a copy before a request's first verdicts: the int4
# copy of the demo target agrees with it on 97% of tokens, 80-96% of its drafts are accepted
SELF_PRIOR_ACCEPTANCE = 0.9
