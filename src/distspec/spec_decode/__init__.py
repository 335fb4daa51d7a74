"""The speculative-decoding algorithms, pure and testable in one process: the one verifier
(verify.py), sampling, drafters (drafter.py: the interface; drafters/: prompt lookup, model
drafters, construction by name), the decoding loops, PEARL's state machine (pearl.py) and the
draft-length policy.
Imports models/ at most; never Ray, gRPC or the scheduler."""
