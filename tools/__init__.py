"""Developer tools that read the repository (not part of the product)."""
