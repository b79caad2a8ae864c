"""Ready-made applications built on `core`: GPT pretraining (and, as they land, diffusion and protein)."""
