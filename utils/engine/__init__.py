"""The training loop and what surrounds it: mixed precision, optimisers and schedules, preemption."""
