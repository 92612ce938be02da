"""``python -m backend``: see ``backend.service.cli``."""

from .service.cli import exit_as_program, main

exit_as_program(main())
