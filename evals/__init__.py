"""collab's evals package."""
