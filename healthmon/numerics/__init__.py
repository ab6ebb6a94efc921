"""Pure-torch numerics behind the monitors: no Lightning, no logging, no global state."""
