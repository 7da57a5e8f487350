"""Models: presets' weights, loading, the tiny model, fetched copies, preflight, accelerations."""
