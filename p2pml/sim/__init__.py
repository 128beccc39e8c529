"""Discrete-event simulator of barrier control, driving the same policy code as real nodes."""
