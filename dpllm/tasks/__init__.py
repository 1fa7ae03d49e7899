"""Tasks: data loading, formatting and evaluation. Task code never imports the privacy code."""
