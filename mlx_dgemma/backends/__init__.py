"""Backend plug-ins: what one backend alone needs, applied to a loaded model through `loader.load_model`."""
