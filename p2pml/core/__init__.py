"""Pure decision code shared by real nodes and the simulator: no I/O, no clock, no global random."""
