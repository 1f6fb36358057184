"""Text to token ids away from the event loop."""
