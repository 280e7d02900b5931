"""Training and evaluating heads, distilling MiniLM: offline work the service never imports.

Serving (``service``, ``core``, ``heads``, ``features``, ``offline``) imports
nothing from here; this package imports serving's heads and extractors, so a
head is trained on the features it is served on.
"""
