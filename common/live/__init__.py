"""Live video in every processor container: pytrickle's stream API, the running stream, its media.

The media (``media``, ``tsinput``, ``handoff``, ``output``) import PyAV; import them from
``common.live.media`` where a stream starts, so a container that never streams does not load it.
"""
