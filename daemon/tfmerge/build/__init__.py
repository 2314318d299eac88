"""The TensorFlow side: everything that reads, checks, merges and verifies graphs.

Only the worker process (or a one-shot command such as ``tfmerge build``) imports these
modules: ``run`` is one whole build; ``check`` one model (``reading``, ``parse``, ``constants``,
``signatures``, ``probe``); ``merge`` and ``writer`` (with ``bundle`` and ``wire``) write the
SavedModel; ``verify`` loads and compares it; ``warmup`` writes the server's warmup file;
``smoke`` asks a live server. ``tfcore`` imports the part of TensorFlow they use.
"""
