"""Recipes: one readable file each, one class with ``setup → run → save → cleanup`` (no inheritance).

Each recipe class carries its ``Settings`` (the schema and defaults of its config) and is registered
under the ``latentforge.recipes`` entry-point group.  A recipe never imports another recipe: what
several share lives in the runner's modules (``run_folder``, ``data``, ``latents``, ``generation``,
``training``, ``distributed``), and one reads another's run folder through the registry.
"""
