"""Scheduling, no network: sessions, KV slot accounting, admission, continuous batching of
verify rounds (ar, sd, PEARL), the speculation switch, recovery from worker failures, metrics,
and the runtime that wires workers (local or on Ray) to the scheduler.
Imports cluster/, workers/ and below; never grpc, starlette or uvicorn (that is server/)."""
