"""The search: tune(), the probe, the space, objectives, results and the study note, storage and local workers."""
