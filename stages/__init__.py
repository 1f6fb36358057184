"""overlapd.stages: the four pipeline stages and the engine they drive."""
