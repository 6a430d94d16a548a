"""collab's routers package."""
