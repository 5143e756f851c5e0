"""The layer below every phase, with no method in it: config loading, errors, atomic files and
manifests, the artifact contract, Hub access, the machine (environment, resources), plots.
Everything above builds on it; it imports nothing above itself.
"""
