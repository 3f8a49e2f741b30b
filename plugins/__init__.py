"""Methods shipped as plugins, installed as ``at_memorization.plugins`` and registered through the
``at_memorization.methods`` entry-point group exactly as a third-party package would."""
