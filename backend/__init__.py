"""blender_t2vz backend: Text2Video-Zero on diffusers, run in its own Python environment."""

__version__ = "0.1.0"
