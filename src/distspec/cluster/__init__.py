"""Ray bring-up: placement groups, tensor-parallel groups of workers, drafter groups."""
