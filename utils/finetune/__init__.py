"""Fine-tuning: one registered job per downstream task (cls, semseg, depth), the pieces they share, metrics and losses."""
