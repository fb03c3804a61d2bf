"""Recipes: typed sections from YAML (`schema`), the `Recipe` and its validation (`recipe`), pre-flight checks (`checks`)."""
