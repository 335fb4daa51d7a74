"""The front doors in front of the scheduler: the gRPC servicer and its call guard, the
OpenAI-compatible HTTP API, the gateway both share (validation, admission, time limits),
TLS, bearer tokens and per-client limits, timers, and `distspec serve`'s wiring and drain.
Imports scheduler/ and below."""
