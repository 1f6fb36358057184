"""overlapd.kernels: native pieces (shared-memory ring, pinned handoffs) and their Python faces."""
