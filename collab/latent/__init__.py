"""Mixture of Thoughts: latent-level collaboration of frozen heterogeneous experts.

Fein-Ashley et al. 2025 (https://arxiv.org/abs/2509.21164). A router over a
frozen sentence embedding picks the top-K experts for a query and the primary
among them; interaction layers at the end of each of Q stacks of every expert
let the primary cross-attend to its peers' hidden states in a shared latent
space. Only the router and the interaction layers train.

- ``collab.latent.system``: ``MixtureOfThoughts`` (a System and a Scorer) and
  ``LatentSystemType`` (``type: latent`` in a spec);
- ``collab.latent.train``: ``train_latent`` (``collab latent train``);
- ``collab.latent.model``: the interaction layers and how they attach (hooks);
- ``collab.latent.router``: the router and its frozen query encoders;
- ``collab.latent.artefact``: the checkpoint directory;
- ``collab.latent.data``: the training conversations.

Importing this package imports no torch; ``import collab`` does not import it.
"""
