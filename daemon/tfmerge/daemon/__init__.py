"""The supervisor: the long-running process. No TensorFlow, ever.

It watches ``frozen_dir`` (``watch``), groups changes into batches (``debounce``), runs each
build in a worker child process (``runner``, ``worker``; ``output`` relays what a worker
writes to stderr as log events), tries a build again after a
transient failure (``retry``) and publishes what the build verified (``pipeline``), follows
a published version until TensorFlow Serving reports it live (``live``, ``tfserving``),
reloads its configuration (``reload``), and speaks to systemd (``notify``) and Prometheus
(``metrics``). ``service`` is the daemon's loop that ties them together; it sleeps on one
wake-up pipe that signals and the watcher write to (``wakeup``).
"""
