"""From result files to conclusions: the table, the phases, the correlations and the figures."""
