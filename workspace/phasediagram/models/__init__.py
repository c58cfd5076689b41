"""Model families (width-k builders) and their train/eval modes."""
