"""Small shared pieces: atomic file writes, checkpoint files, RNG states, argument checks."""
