"""What rank 0 tells the user and writes down: metrics.jsonl, the console, plots and the report, W&B."""
