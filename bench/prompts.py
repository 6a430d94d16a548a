"""Chat prompts shared by the generation benchmarks."""

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue in three sentences.",
    "List five fruits and one fact about each.",
    "What are the main causes of the French Revolution?",
    "Describe how a bicycle works.",
    "Give me a recipe for pancakes.",
    "What is photosynthesis?",
    "Write a poem about the sea.",
]
