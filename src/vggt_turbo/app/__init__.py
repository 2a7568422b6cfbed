"""The ``vggt-turbo`` application: ``reconstruct`` (input loading, weights, inference, the exporters, the report),
``view`` and ``plan``'s command line.

Kept apart from the library so that ``import vggt_turbo`` (the patches, their configuration and the planner) costs
no image decoder, exporter or plotting package: a user who patches their own model never loads any of this. The
application depends on the library, never the other way round.
"""
