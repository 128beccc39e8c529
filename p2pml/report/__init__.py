"""Plots (matplotlib), terminal tables and progress (rich), and the JSON records of results."""
