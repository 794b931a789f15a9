"""Example external steptitan plugins (registered through the ``steptitan.plugins`` entry points)."""
