"""Where a job trains: local processes (accelerate for several) or a Ray cluster."""
