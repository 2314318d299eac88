"""Process exit codes, shared by every command (documented in docs/config.md)."""

from typing import Final

OK: Final = 0
#: The command ran but something was refused or failed (a rejected model, a failed build).
FAILED: Final = 1
#: Bad command line.
USAGE: Final = 2
#: Another daemon already holds the state folder (sysexits EX_TEMPFAIL).
LOCKED: Final = 75
#: The configuration is invalid (sysexits EX_CONFIG); the unit's RestartPreventExitStatus.
CONFIG: Final = 78
