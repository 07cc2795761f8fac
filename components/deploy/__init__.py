"""The deploy stage: the champion the promotion gate moved, served by a KServe InferenceService."""
