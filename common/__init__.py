"""The runtime vendored into every image: trickle, processor base classes, codecs, registration.

Nothing is imported here on purpose: the node image carries ``common`` without the media codecs,
so ``import common.trickle`` must not pull in numpy or OpenCV. Processors import
``common.processor``.
"""
