"""tfmerge's benchmark suite: ``python -m bench`` from the repository root.

It compares, on generated sets of frozen graphs, the copy floor (``cp -r`` and an fsync of
the same bytes), the naive merge (``import_graph_def`` into one graph, ``SavedModelBuilder``)
and ``tfmerge build``; it times the daemon from the last upload to the published version, and
measures the idle supervisor. Results go to docs/benchmarks.md with a plot beside it.
"""
