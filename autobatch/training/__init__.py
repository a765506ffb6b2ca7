"""Training with a tuned config: train(), its supervisor and the child that trains."""
