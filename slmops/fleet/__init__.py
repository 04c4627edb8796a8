"""Operating models across a fleet: the control plane (``control/``) and what devices share with it."""
