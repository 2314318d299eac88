"""The two folders tfmerge owns besides the uploads: ``serving_dir`` and ``state_dir``.

``fs`` holds every file-system primitive (durable writes, rename into place, locks);
``publish`` is the serving folder as TensorFlow Serving reads it (versions, staging, the one
publish transaction, history, pruning); ``state`` is the state folder (last accepted inputs,
build records); ``rollback`` republishes an older version. No TensorFlow here.
"""
