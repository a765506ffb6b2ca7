"""What is trained: the workload and its data, and loading a task by import path."""
