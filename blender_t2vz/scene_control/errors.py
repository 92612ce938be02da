"""The one exception of scene control: a bad value, named in the message."""


class SceneControlError(ValueError):
    """Scene controls cannot be made; the message names the bad value."""
