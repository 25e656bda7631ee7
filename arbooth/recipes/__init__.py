"""Training recipes: one explicit loop per file."""
