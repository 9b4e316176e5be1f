"""Side-by-side performance and accuracy scripts; ``python -m bench`` runs them all."""
