"""collab's decoding package."""
