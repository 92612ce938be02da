"""Frames in and out: reading videos and image folders, control images and detectors,
OpenPose drawing, and the staged (atomic) output folder."""
