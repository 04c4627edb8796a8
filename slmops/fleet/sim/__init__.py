"""A fleet simulator: thousands of devices as asyncio tasks speaking the agent's protocol over real HTTP to a real
``slmops fleet serve``, with the agent's own checks of signed desired state, latencies drawn from a stated model of
each hardware class (``classes``), injected faults (``faults``), and a run that measures a rollout end to end
(``runner``) and shows it as a table and a chart (``report``).

    slmops fleet simulate --devices 1000 --waves 1,10,50,100 --bake 5s --png sim.png
"""
