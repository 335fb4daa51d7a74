"""Training the demo drafter: self-distillation from the target (distspec train-drafter).
On top, beside bench/: only the CLI imports it."""
