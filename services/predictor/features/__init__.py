"""What a head reads: one :class:`~.extractor.FeatureExtractor` per kind of features.

A head's card names its kind (``registry.kind_of``); ``registry.build_extractors``
builds one extractor per distinct setting and the core asks it for features.
Kinds: ``minilm`` (the stock sentence encoder, ``minilm.py``), ``minilm-tuned``
(MiniLM with a weight delta applied, ``distilled.py``) and
``smollm2-135m-instruct`` (``smollm2.py``).
"""
