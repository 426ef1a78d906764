"""AstrAI training: Lightning modules, data modules and the astrai-train command."""
