"""Plain typed records and configs that flow between stages."""
