"""Process exit codes, shared by every command (documented in docs/config.md)."""

from typing import Final

OK: Final = 0
#: The command ran but something was refused or failed (a rejected model, a failed build).
FAILED: Final = 1
#: Bad command line.
USAGE: Final = 2
#: A folder tfmerge writes cannot be written: state_dir or serving_dir is under a file,
#: read-only, full or failing (sysexits EX_IOERR); in the unit's RestartPreventExitStatus.
FOLDER: Final = 74
#: Another daemon already holds the state folder (sysexits EX_TEMPFAIL).
LOCKED: Final = 75
#: The configuration is invalid (sysexits EX_CONFIG); the unit's RestartPreventExitStatus.
CONFIG: Final = 78
