"""Models: where they come from, loading them, their VAEs, tiny autoencoders and samplers."""
