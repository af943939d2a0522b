"""Host-side converters: export, quantization recipes, the accuracy gate and op-coverage checks.

Imported lazily by ``edgepack convert``; never imported by the agent.
"""
