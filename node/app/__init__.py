"""Stage ``app``: the ``srnode`` command line and its commands, the running node's wiring, the HTTP API, the demo
and the preview. The top of the house: it may import every stage; no stage imports it.
"""
