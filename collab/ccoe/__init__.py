"""CCoE: a compact LLM with a collaboration of experts on one shared, frozen backbone.

Li et al. 2024 (https://arxiv.org/abs/2407.11686). Every expert is its own copy of
a base model's top layers: a query runs through the base's bottom layers (the
backbone) once, then through the layers of the expert a gate picks. Each expert
trains separately with the backbone frozen and may start at its own depth; "pop"
takes one out as a standalone model, "push" puts a fine-tuned one back.

- ``collab.ccoe.system``: ``CCoESystem`` (a System and a Scorer) and
  ``CCoESystemType`` (``type: ccoe`` in a spec);
- ``collab.ccoe.train``: ``train_expert`` (``collab ccoe train``);
- ``collab.ccoe.standalone``: ``pop_expert`` and ``push_expert``
  (``collab ccoe pop|push``);
- ``collab.ccoe.model``: the shared backbone and its branches, one batched forward
  pass whose rows take different branches;
- ``collab.ccoe.gate``: which branch answers (a collab router, or a fixed choice);
- ``collab.ccoe.artefact``: the expert directory.

Importing this package imports no torch; ``import collab`` does not import it.
"""
