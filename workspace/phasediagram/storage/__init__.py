"""Files on disk: atomic writes, checkpoints, result files, the study folder layout."""
