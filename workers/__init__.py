"""Programs that run on worker nodes: the training harness, the comparison job, the benchmark."""
