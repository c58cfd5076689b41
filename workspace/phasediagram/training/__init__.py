"""Training runs: one seed at a time, or a cell's seeds as one ensemble."""
