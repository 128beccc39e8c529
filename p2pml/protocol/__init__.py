"""Wire messages, their codec and (later) the sans-IO protocol machines."""
