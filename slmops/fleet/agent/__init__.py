"""The edge agent: runs beside ``slmops serve`` on a device, polls its desired state from the control plane, checks
it (``trust``) before anything is activated, and reports aggregates."""
