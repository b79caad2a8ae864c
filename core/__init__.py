"""Loom's engine: recipes, launching and meshes, the Booster and its plugins, the trainer."""

__version__ = "0.1.0"
