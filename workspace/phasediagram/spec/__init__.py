"""The study as data: the spec, its cells, and the named presets."""
