"""``python -m backend``: see ``backend.cli``."""

from .cli import exit_as_program, main

exit_as_program(main())
