"""The search: tune(), the search runner, the probe, the space, objectives, results and the study note, storage, create-once coordination and local workers."""
