"""Fine-tuning: the shared runner, one module per downstream task, metrics and losses."""
