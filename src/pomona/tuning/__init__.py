"""`pomona tune`: the study's storage, workers and results (`study`), the objective (`tune`) and the trackers
(`tracking`)."""
