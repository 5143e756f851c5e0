"""The notebooks as one run: the ordered steps with their inputs and outputs, the papermill runner,
the run's report, and the rehearsal stand-ins.
"""
