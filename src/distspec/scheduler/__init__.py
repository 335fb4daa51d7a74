"""Sessions, KV slot accounting, batched verification, admission control, the gRPC servicer."""
