"""Libraries used only by the tools (measurement primitives, pseudo-labelling networks)."""
