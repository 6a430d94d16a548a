"""collab's merging package."""
