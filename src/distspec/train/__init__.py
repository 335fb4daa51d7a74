"""Training the demo drafter: self-distillation from the target (distspec train-drafter)."""
