"""The harnesses: benchmarks (one process, serving, load, edge, EasySpec, chaos), their
clients, relay and plots; JSON + PNG out. On top of everything: only the CLI imports them."""
