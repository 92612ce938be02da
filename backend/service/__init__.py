"""A job end to end (runner) and the two ways in: the ``python -m backend`` CLI and the
JSON-lines worker the add-on talks to."""
