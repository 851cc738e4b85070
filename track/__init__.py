"""Single-object tracking transfer (OSTrack-style); see track/README.md."""
