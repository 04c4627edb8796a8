"""SLMOps on one machine: hardware and placement, variants, quantize, bench, eval, optimize."""
